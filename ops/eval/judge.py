"""The judge: a model that reads the candidates' answers to a turn and says which is best.

The answers are shown under letters in an order drawn from the turn's id (the same on every
rerun, different from turn to turn), so that no candidate always sits first, where judges are
known to favour an answer.
"""

from __future__ import annotations

import random
import re
import string

import msgspec

from libra.processors.llm.chain import AllProvidersFailed, ChainResult, ProviderChain
from libra.processors.llm.providers.base import ChatMessage

from .results import Answer, Verdict

__all__ = ["judge_answers"]

_INSTRUCTIONS = (
    "You compare the answers that chat assistants gave to the same message from a person."
    " Judge helpfulness, correctness, and whether the answer is in the person's language."
    ' Reply with one JSON object and nothing else: {"best": "<letter>", "scores":'
    ' {"<letter>": <1 to 10>, ...}, "reason": "<one sentence>"}.'
)
_OBJECT = re.compile(r"\{.*\}", re.S)


class _Said(msgspec.Struct):
    best: str
    scores: dict[str, float]
    reason: str = ""


def _prompt(user_text: str, lettered: dict[str, Answer]) -> tuple[ChatMessage, ...]:
    shown = "\n\n".join(f"Answer {letter}:\n{a.text}" for letter, a in lettered.items())
    return (
        ChatMessage(role="system", content=_INSTRUCTIONS),
        ChatMessage(role="user", content=f"The person wrote:\n{user_text}\n\n{shown}"),
    )


async def judge_answers(
    chain: ProviderChain,
    *,
    turn: str,
    user_text: str,
    answers: list[Answer],
    judge: str,
    digest: str,
) -> Verdict:
    """Asks the judge to compare ``answers``; a judge that fails or rambles gives an error."""
    if not answers:
        return Verdict(turn=turn, judge=judge, digest=digest, error="no answer to judge")
    order = sorted(answers, key=lambda a: a.candidate)
    random.Random(turn).shuffle(order)
    lettered = dict(zip(string.ascii_uppercase, order, strict=False))
    pieces: list[str] = []
    try:
        async for piece in chain.stream(
            _prompt(user_text, lettered), max_tokens=400, temperature=0
        ):
            if not isinstance(piece, ChainResult):
                pieces.append(piece)
    except AllProvidersFailed as exc:
        return Verdict(turn=turn, judge=judge, digest=digest, error=str(exc))
    reply = "".join(pieces)
    try:
        found = _OBJECT.search(reply)
        said = msgspec.json.decode(found.group(0) if found else reply, type=_Said)
    except msgspec.DecodeError:
        return Verdict(turn=turn, judge=judge, digest=digest, error=f"not a verdict: {reply!r}")
    names = {letter: answer.candidate for letter, answer in lettered.items()}
    return Verdict(
        turn=turn,
        judge=judge,
        digest=digest,
        best=names.get(said.best.strip(), ""),
        scores={names[k]: v for k, v in said.scores.items() if k in names},
        reason=said.reason,
    )
