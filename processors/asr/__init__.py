"""The asr processor: speech-to-text for captured utterances (faster-whisper, Groq Whisper)."""
