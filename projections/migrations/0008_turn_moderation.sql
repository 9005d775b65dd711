-- Moderation of a person's input (issue 18): which classifier decided (NULL: none was asked;
-- 'none': no engine could answer and the fail policy decided), the categories it flagged
-- (empty: it let the input through) and how long it took. Grafana's LLM dashboard charts them.
ALTER TABLE turns
    ADD COLUMN moderation_engine     text,
    ADD COLUMN moderation_categories text[],
    ADD COLUMN moderation_ms         double precision;
