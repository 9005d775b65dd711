"""Libra on Discord: text messages in as events, streamed replies and slash commands out.

``gateway.DiscordGateway`` is the component; ``voice`` holds the voice transport.
"""
