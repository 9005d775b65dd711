"""Memory: completed exchanges embedded into pgvector, recalled into later prompts."""
