"""Loopback fakes of the wires Libra talks to: Discord and the LLM, ASR and TTS vendors.

They answer as the real APIs do, so the real SDKs and clients can be tested and benchmarked
against them; they are installed with Libra because `libra bench` uses them.
"""
