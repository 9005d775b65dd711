"""The prompt for a turn: persona, language, memories, recent history, the turn itself.

History and memories are trimmed to the model's window, newest history first; the system prompt
and the person's message always fit (the person's message was bounded by admission).

With no persona chosen (``LIBRA_PERSONA``, a server's ``/persona``, an eval's candidate), a
prompt for the embedded SmolLM2 gets ``SMALL_MODEL_PERSONA`` instead of ``DEFAULT_PERSONA``: a
model of 135M parameters follows one short instruction, and the long persona leads it astray.
The choice follows the model the prompt is built for (the server's ``/model`` or the first
provider's); where the embedded model is only a fallback behind a larger one, it gets that
one's prompt.

While the database is down (a read failed within ``OUTAGE_RETRY_SEC``, or takes over
``DATABASE_TIMEOUT_SEC``) the prompt is the persona and the turn alone, and says so
(``degraded``), for the reply's ``llm.completed`` to record.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import NamedTuple

import asyncpg

from libra.contracts import Attachment, RetrievedChunk, TurnAccepted
from libra.processors.knowledge.retrieval import KnowledgeSource
from libra.processors.memory.store import MemoryStore
from libra.processors.moderation.policy import DEFAULT_POLICY, ServerPolicy
from libra.runtime.outage import Breaker, Unavailable
from libra.tools.registry import TOOLS_KEY

from .providers.base import ChatMessage
from .providers.embedded import MODEL_NAME as EMBEDDED_MODEL

__all__ = [
    "DEFAULT_PERSONA",
    "SMALL_MODEL_PERSONA",
    "Context",
    "Prompt",
    "PromptBuilder",
    "default_persona",
    "estimate_tokens",
    "sources_text",
]

log = logging.getLogger("libra.llm")

DEFAULT_PERSONA = (
    "You are Libra, a friendly and helpful assistant that people talk to in Discord, by text"
    " and by voice. Answer clearly and concisely; use Markdown sparingly."
)
# Asked "What is the capital of France?" (greedy) under the default persona, SmolLM2-135M
# answered in French nonsense; under this one "The capital of France is Paris.", and it still
# says it is Libra. The language line and the voice style do not lead it astray.
SMALL_MODEL_PERSONA = "You are a helpful AI assistant named Libra. Keep answers short."
_SMALL_MODELS = (EMBEDDED_MODEL,)
# The server's settings for the prompt (channel rows last) and the turns before this one, newest
# first: ($1 scopes, $2 conversation, $3 this turn, $4 its time, $5 how many messages)
_SETTINGS_AND_HISTORY = """
SELECT
  ARRAY(SELECT (key, value) FROM settings
        WHERE scope = ANY($1::text[])
          AND (key IN ('model', 'persona', 'tools') OR key LIKE 'moderation.%') AND value <> ''
        ORDER BY (scope LIKE 'channel:%') ASC) AS settings,
  ARRAY(SELECT (role, content) FROM messages
        WHERE conversation = $2 AND turn <> $3 AND at <= $4
        ORDER BY at DESC LIMIT $5) AS history
"""
_LANGUAGES = {"ko": "Korean", "en": "English", "ja": "Japanese", "zh": "Chinese"}
_VOICE_STYLE = (
    "This turn is spoken: your answer will be read aloud. Use short sentences, no Markdown,"
    " no lists, no code."
)


def sources_text(knowledge: tuple[RetrievedChunk, ...]) -> str:
    """The numbered sources of a prompt and how to cite them."""
    sources = "\n\n".join(
        f"[{n}] {chunk.title or chunk.document}\n{chunk.text}"
        for n, chunk in enumerate(knowledge, start=1)
    )
    return (
        "Sources from this conversation's knowledge base that may answer the message:\n\n"
        f"{sources}\n\nWhere you use a source, cite it by its number in brackets, like [1]."
        " If the sources do not answer the message, say so or answer from what you know,"
        " without a citation."
    )


def default_persona(model: str) -> str:
    """The persona for ``model`` (``model`` or ``provider:model``) when none was chosen."""
    return SMALL_MODEL_PERSONA if model.split(":", 1)[-1] in _SMALL_MODELS else DEFAULT_PERSONA


def estimate_tokens(text: str) -> int:
    """A cautious token count: about one per three UTF-8 bytes (right for Latin and Hangul)."""
    return len(text.encode("utf-8")) // 3 + 1


class Context(NamedTuple):
    """What a prompt is read from: the server's settings, the history, the recalled memories;
    ``degraded`` names the dependencies that were down (and it was read without)."""

    settings: dict[str, str]
    history: list[ChatMessage]
    memories: list[str]
    degraded: tuple[str, ...] = ()
    knowledge: tuple[RetrievedChunk, ...] = ()  # the sources, [1] first


@dataclass(frozen=True)
class Prompt:
    messages: tuple[ChatMessage, ...]
    model: str | None  # a server's /model choice, "provider:model" or "model"; None: default
    degraded: tuple[str, ...] = ()
    moderation: ServerPolicy = DEFAULT_POLICY  # the server's, for the reply's checks
    knowledge: tuple[RetrievedChunk, ...] = ()  # the sources in the system message, [1] first
    tools: str = ""  # the server's /tools choice (names, "none"); empty: TOOLS_ENABLED


def _attachment_note(attachment: Attachment, can_see: bool) -> str:
    if attachment.kind == "text" and attachment.text:
        return f"[file {attachment.name}]\n{attachment.text}"
    if attachment.kind == "image":
        seen = "attached" if can_see else "not shown: this model cannot see images"
        return f"[image {attachment.name} ({seen})]"
    size = f", {attachment.size:,} bytes" if attachment.size else ""
    return f"[attachment {attachment.name} ({attachment.content_type or 'file'}{size}) not read]"


class PromptBuilder:
    """Builds prompts from the turn, the server's settings, history and memories."""

    def __init__(
        self,
        pool: asyncpg.Pool | None,
        memory: MemoryStore | None,
        *,
        persona: str = "",
        context_tokens: int = 8192,
        max_tokens: int = 512,
        history_turns: int = 20,
        memory_k: int = 4,
        recall_budget_s: float = 0.3,
        vision_models: tuple[str, ...] = (),
        breaker: Breaker | None = None,
        knowledge: KnowledgeSource | None = None,
        knowledge_budget_s: float = 1.0,
    ) -> None:
        self.pool, self.memory = pool, memory
        self.knowledge, self.knowledge_budget_s = knowledge, knowledge_budget_s
        self.breaker = breaker or Breaker("postgres", timeout_s=2.0)
        self.persona = persona  # empty: the default persona of the model answering
        self.context_tokens, self.max_tokens = context_tokens, max_tokens
        self.history_turns, self.memory_k = history_turns, memory_k
        self.recall_budget_s = recall_budget_s
        self.vision_models = vision_models

    def can_see(self, model: str) -> bool:
        name = model.split(":", 1)[-1].lower()
        return any(name.startswith(prefix.lower()) for prefix in self.vision_models)

    async def build(
        self,
        turn: TurnAccepted,
        *,
        default_model: str,
        persona: str = "",
        context: Context | None = None,
    ) -> Prompt:
        """Returns the turn's prompt as of the turn's time: the history and memories before it.

        ``persona`` replaces the server's and the default one (an eval's candidate prompt);
        ``context`` is what :meth:`context` read for the turn already.
        """
        context = context or await self.context(turn)
        settings, history, memories = context.settings, context.history, context.memories
        degraded = context.degraded
        model = settings.get("model") or None
        target = model or default_model
        chosen = persona or settings.get("persona") or self.persona or default_persona(target)
        system = self._system(chosen, turn, memories, context.knowledge)
        current = self._current(turn, target)
        budget = self.context_tokens - self.max_tokens - estimate_tokens(system.content)
        budget -= estimate_tokens(current.content)
        kept: list[ChatMessage] = []
        for message in reversed([*history, *self._reply_chain(turn)]):
            budget -= estimate_tokens(message.content)
            if budget < 0:
                break
            kept.append(message)
        policy = DEFAULT_POLICY
        if turn.origin.guild:
            policy = ServerPolicy.from_settings(f"guild:{turn.origin.guild}", settings)
        return Prompt(
            messages=(system, *reversed(kept), current),
            model=model,
            degraded=degraded,
            moderation=policy,
            knowledge=context.knowledge,
            tools=settings.get(TOOLS_KEY, ""),
        )

    async def context(self, turn: TurnAccepted) -> Context:
        """Reads what the turn's prompt is made of: settings, recent history and memories;
        none of them while the database is down."""
        try:
            return await self.breaker.call(lambda: self._read(turn))
        except Unavailable as exc:
            log.warning("answering turn %s without its history and memories: %s", turn.turn, exc)
            return Context({}, [], [], degraded=("postgres",))

    async def _read(self, turn: TurnAccepted) -> Context:
        (settings, history), memories, knowledge = await asyncio.gather(
            self._settings_and_history(turn), self._memories(turn), self._knowledge(turn)
        )
        return Context(settings, history, memories, knowledge=knowledge)

    def _system(
        self,
        persona: str,
        turn: TurnAccepted,
        memories: list[str],
        knowledge: tuple[RetrievedChunk, ...] = (),
    ) -> ChatMessage:
        parts = [persona]
        language = _LANGUAGES.get(turn.language)
        if language:
            parts.append(f"Reply in {language}, the language the person used.")
        if turn.modality == "voice":
            parts.append(_VOICE_STYLE)
        if memories:
            recalled = "\n---\n".join(memories)
            parts.append(f"Earlier exchanges with this person that may be relevant:\n{recalled}")
        if knowledge:
            parts.append(sources_text(knowledge))
        return ChatMessage(role="system", content="\n\n".join(parts))

    def _current(self, turn: TurnAccepted, model: str) -> ChatMessage:
        can_see = self.can_see(model)
        notes = [_attachment_note(a, can_see) for a in turn.attachments]
        images = tuple(a.url for a in turn.attachments if a.kind == "image" and a.url and can_see)
        content = "\n\n".join([turn.text, *notes]) if notes else turn.text
        return ChatMessage(role="user", content=content, images=images)

    def _reply_chain(self, turn: TurnAccepted) -> list[ChatMessage]:
        return [ChatMessage(role=m.role, content=m.text) for m in turn.context if m.text]

    async def _settings_and_history(
        self, turn: TurnAccepted
    ) -> tuple[dict[str, str], list[ChatMessage]]:
        if self.pool is None:
            return {}, []
        scopes = [f"channel:{turn.conversation}"]
        if turn.origin.guild:
            scopes.append(f"guild:{turn.origin.guild}")
        # One statement, one round trip: a prompt is on the clock of every reply, and on a busy
        # machine each query's backend waits its turn for a core.
        row = await self.pool.fetchrow(
            _SETTINGS_AND_HISTORY,
            scopes,
            turn.conversation,
            turn.turn,
            turn.at,
            self.history_turns * 2,
        )
        settings = dict(row["settings"])  # channel rows last: they win
        messages = [ChatMessage(role=role, content=text) for role, text in reversed(row["history"])]
        return settings, messages

    async def _knowledge(self, turn: TurnAccepted) -> tuple[RetrievedChunk, ...]:
        if self.knowledge is None:
            return ()
        try:  # like memories: a slow embedding API must not hold every reply back
            async with asyncio.timeout(self.knowledge_budget_s):  # (wait_for: a task per read)
                return await self.knowledge.retrieve(turn)
        except TimeoutError:
            log.warning(
                "knowledge retrieval took over %.0f ms; answering without it",
                self.knowledge_budget_s * 1000,
            )
            return ()

    async def _memories(self, turn: TurnAccepted) -> list[str]:
        if self.memory is None or self.memory_k <= 0:
            return []
        try:  # an embedding API that is slow today must not hold every reply back
            async with asyncio.timeout(self.recall_budget_s):
                return await self.memory.recall(
                    user=turn.user,
                    conversation=turn.conversation,
                    text=turn.text,
                    k=self.memory_k,
                    before=turn.at,
                )
        except TimeoutError:
            log.warning(
                "memory recall took over %.0f ms; answering without it", self.recall_budget_s * 1000
            )
            return []
