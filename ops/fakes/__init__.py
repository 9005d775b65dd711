"""Loopback fakes of the wires Libra talks to (Discord, LLM, ASR and TTS vendors), for tests and benchmarks."""
