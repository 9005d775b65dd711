"""What text the HTTP API takes, and its refusals in Libra's words.

A user id may hold any printable text (dots, spaces, ``*``, ``>``, ``~`` are escaped into
subject tokens) but no control characters: NUL cannot be stored in PostgreSQL, and the others
have no place in a name. Message text may hold anything but a lone surrogate (``"\\ud800"`` in
JSON), which is not a character and cannot be written as UTF-8, so it could never reach the log.
NUL and control characters in a message are kept (the history stores NUL as U+FFFD).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, Field

__all__ = [
    "MAX_ID_CHARS",
    "MessageText",
    "UserId",
    "id_problem",
    "text_problem",
    "validation_problem",
]

MAX_ID_CHARS = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be taken as text, or None."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return "holds a lone surrogate (\\ud800-\\udfff), which is not valid Unicode text"
    return None


def id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a user id, or None."""
    if not value or len(value) > MAX_ID_CHARS:
        return f"must be 1 to {MAX_ID_CHARS} characters"
    if _CONTROL.search(value):
        return "cannot hold NUL or other control characters"
    return text_problem(value)


def _checked(problem: Callable[[str], str | None]) -> AfterValidator:
    def check(value: str) -> str:
        if (why := problem(value)) is not None:
            raise ValueError(why)
        return value

    return AfterValidator(check)


UserId = Annotated[str, Field(description="Who is talking"), _checked(id_problem)]
MessageText = Annotated[str, Field(description="What they say"), _checked(text_problem)]

# Pydantic's error types, said in Libra's words ({...} from the error's context).
_PROBLEMS = {
    "missing": "is required",
    "json_invalid": "is not valid JSON",
    "json_type": "is not valid JSON",
    "model_attributes_type": "must be a JSON object",
    "dict_type": "must be a JSON object",
    "string_type": "must be a string",
    "string_unicode": "is not valid Unicode text",
    "string_too_short": "is too short (at least {min_length} characters)",
    "string_too_long": "is too long (at most {max_length} characters)",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
}


def validation_problem(error: Mapping[str, Any]) -> tuple[str, str]:
    """One of pydantic's errors as Libra says it: the field, and what is wrong with it."""
    ctx = error.get("ctx") or {}
    if error["type"] == "value_error":  # one of ours, raised by a check above
        problem = str(ctx.get("error", "is not valid"))
    else:
        try:
            problem = _PROBLEMS.get(error["type"], "is not valid").format(**ctx)
        except (KeyError, IndexError):
            problem = "is not valid"
    where = ".".join(str(p) for p in error["loc"] if p not in ("body", "path", "query", "form"))
    if error["type"].startswith("json"):  # its location is a byte offset, not a field
        where = ""
    return where or "the body", problem
