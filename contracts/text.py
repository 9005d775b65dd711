"""Text from a platform, made fit for an event.

JSON may spell a lone UTF-16 surrogate (``"\\ud800"``), which decodes to a Python string that
cannot be written as UTF-8, so an event holding it could never be published. The HTTP edge
refuses such text (400); an edge that must keep a message (a Discord message cannot be sent
back) replaces each lone surrogate with U+FFFD, keeping what was said around it.
"""

from __future__ import annotations

__all__ = ["well_formed"]


def well_formed(text: str) -> str:
    """Returns ``text`` with each lone surrogate replaced by U+FFFD (and split pairs joined)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text
