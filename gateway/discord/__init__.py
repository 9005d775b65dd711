"""Libra on Discord: the text gateway and the voice transport."""
