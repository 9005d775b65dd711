"""The tts processor: speaks the replies to voice turns (Cartesia, ElevenLabs, Cloudflare,
espeak-ng)."""
