"""The llm processor: answers accepted turns, streaming, through a chain of providers."""
