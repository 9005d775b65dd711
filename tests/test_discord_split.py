"""Replies longer than a Discord message split at good places, code blocks kept whole."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from libra.gateway.discord.split import split_message

FENCE_MARKS = re.compile(r"```[A-Za-z0-9_+\-.#]*|\s")


def _same_words(chunks: list[str], text: str) -> bool:
    """Equal but for whitespace at the cuts and the fences a split closed and reopened."""
    return FENCE_MARKS.sub("", "\n".join(chunks)) == FENCE_MARKS.sub("", text)


def test_short_text_is_one_message() -> None:
    assert split_message("  hello there \n") == ["hello there"]
    assert split_message("") == []


def test_cuts_at_the_last_paragraph_break_that_fits() -> None:
    first = "a" * 1200
    second = "b" * 1200
    chunks = split_message(f"{first}\n\n{second}")
    assert chunks == [first, second]


def test_cuts_at_a_sentence_end_when_there_is_no_break() -> None:
    sentence = "This is a sentence of some length. "
    text = sentence * 100  # 3,500 characters, no newline
    chunks = split_message(text)
    assert len(chunks) == 2
    assert all(len(c) <= 2000 for c in chunks)
    assert chunks[0].endswith(".")
    assert _same_words(chunks, text)


def test_a_cut_inside_a_code_block_closes_and_reopens_the_fence() -> None:
    code = "\n".join(f"print({i})  # line {i}" for i in range(200))
    text = f"Here is the code:\n\n```python\n{code}\n```\n\nThat is all."
    chunks = split_message(text)
    assert len(chunks) >= 3
    for chunk in chunks:
        assert len(chunk) <= 2000
        assert chunk.count("```") % 2 == 0
    assert chunks[0].endswith("\n```")
    assert chunks[1].startswith("```python\n")
    assert _same_words(chunks, text)


def test_a_word_longer_than_a_message_is_cut_hard() -> None:
    chunks = split_message("x" * 4500)
    assert [len(c) for c in chunks] == [1996, 1996, 508]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(alphabet="abc .!?\n가나", min_size=1, max_size=700),
            st.builds(
                lambda body, lang: f"```{lang}\n{body}\n```",
                st.text(alphabet="xy =()\n", max_size=900),
                st.sampled_from(["", "py", "js"]),
            ),
        ),
        min_size=1,
        max_size=12,
    ),
    st.integers(min_value=60, max_value=2000),
)
def test_every_split_fits_keeps_fences_paired_and_loses_nothing(parts, limit) -> None:
    text = "\n\n".join(parts)
    chunks = split_message(text, limit)
    assert all(0 < len(c) <= limit for c in chunks)
    assert all(c.count("```") % 2 == 0 for c in chunks)
    assert _same_words(chunks, text)
