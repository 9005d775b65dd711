"""The HTTP API of the seed: chat completions (streamed), history, health, metrics."""
