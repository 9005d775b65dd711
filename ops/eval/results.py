"""An eval's results: one JSON line per answer or verdict, appended as each one completes.

The file is the eval's state: a run stopped with Ctrl-C leaves every finished answer in it, and
the next run skips them (by turn, candidate and the candidate's configuration digest).
"""

from __future__ import annotations

from pathlib import Path

import msgspec

__all__ = ["Answer", "Results", "Verdict"]


class Answer(msgspec.Struct, frozen=True, kw_only=True, tag="answer"):
    """One candidate's answer to one turn, with what it cost and how long it took."""

    turn: str
    candidate: str
    digest: str
    text: str = ""
    provider: str = ""
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    cost_usd: float | None = None
    error: str = ""


class Verdict(msgspec.Struct, frozen=True, kw_only=True, tag="verdict"):
    """The judge's comparison of the candidates' answers to one turn."""

    turn: str
    judge: str
    digest: str
    best: str = ""
    scores: dict[str, float] = {}
    reason: str = ""
    error: str = ""


Line = Answer | Verdict
_decoder = msgspec.json.Decoder(Line)
_encoder = msgspec.json.Encoder()


class Results:
    """The JSON-lines file of an eval, read back on start and appended to as results come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.answers: dict[tuple[str, str], Answer] = {}
        self.verdicts: dict[str, Verdict] = {}
        if path.exists():
            for line in path.read_bytes().splitlines():
                try:
                    self._keep(_decoder.decode(line))
                except msgspec.DecodeError:
                    continue  # the half-written line of a run that was killed
        path.parent.mkdir(parents=True, exist_ok=True)
        self._out = path.open("ab")

    def has_answer(self, turn: str, candidate: str, digest: str) -> bool:
        found = self.answers.get((turn, candidate))
        return found is not None and found.digest == digest

    def has_verdict(self, turn: str, digest: str) -> bool:
        found = self.verdicts.get(turn)
        return found is not None and found.digest == digest

    def add(self, line: Line) -> None:
        """Keeps a result and writes it through to the file at once."""
        self._keep(line)
        self._out.write(_encoder.encode(line) + b"\n")
        self._out.flush()

    def _keep(self, line: Line) -> None:
        match line:
            case Answer():
                self.answers[(line.turn, line.candidate)] = line
            case Verdict():
                self.verdicts[line.turn] = line

    def close(self) -> None:
        self._out.close()
