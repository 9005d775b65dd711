-- A recall is always one person's memories in one conversation: the B-tree on the owner finds
-- them and they are ranked exactly. The HNSW index over everyone's memories helped no recall
-- (pgvector filters after an HNSW scan, so a person's few rows among many would be missed;
-- the planner takes the owner's B-tree) and cost every stored memory a graph insertion, about
-- a hundred times the rest of the write.
DROP INDEX IF EXISTS memories_embedding;
