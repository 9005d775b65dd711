"""The memory processor: remembers each completed exchange, forgets on a reset."""

from __future__ import annotations

from libra.contracts import CONSUMERS, AnyEvent, Event, LlmCompleted, SessionMemoryReset

from .store import MemoryStore

__all__ = ["MemoryProcessor", "exchange_text"]


def exchange_text(user_text: str, reply: str) -> str:
    """What one remembered exchange reads like when it is recalled into a prompt."""
    return f"User: {user_text.strip()}\nLibra: {reply.strip()}"


class MemoryProcessor:
    """Embeds ``llm.completed`` exchanges; ``session.memory_reset`` forgets them."""

    spec = CONSUMERS["memory"]

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def handle(self, event: AnyEvent) -> list[Event]:
        """Writes rows, emits no events."""
        match event:
            case LlmCompleted() if event.user_text and event.text:
                await self.store.remember(
                    event_id=event.id,
                    user=event.user,
                    conversation=event.conversation,
                    turn=event.turn,
                    content=exchange_text(event.user_text, event.text),
                    at=event.at,
                )
            case SessionMemoryReset():
                await self.store.forget(
                    event_id=event.id,
                    user=event.user,
                    conversation=event.conversation if event.scope == "conversation" else None,
                    at=event.at,
                )
        return []
