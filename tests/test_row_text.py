"""Streaming one row's text: never half a character, never half a stop string, always the answer.

Runs the tiny model's byte-level tokenizer, where a character outside ASCII
is several tokens and ``[INST]`` is six.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.serving.row_text import REPLACEMENT, RowText
from finetune.generation import strip_stop_strings
from finetune.modeling import load_tokenizer

STOPS = ("[INST]",)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir)


def stream(tokenizer: Any, token_ids: list[int], stops=STOPS) -> tuple[RowText, list[str]]:
    """Feed tokens as the worker does; the deltas the caller would have seen."""
    row = RowText(tokenizer, stops)
    deltas = []
    for token in token_ids:
        if row.add(token):
            break
        deltas.append(row.take_new(final=False))
    row.finish()
    deltas.append(row.take_new(final=True))
    return row, [d for d in deltas if d]


def ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_character_split_over_tokens_is_streamed_whole(tokenizer: Any):
    text = "Fresh ⛷ powder, très bien 雪"
    row, deltas = stream(tokenizer, ids(tokenizer, text))
    assert len(deltas) > 3, "the text should stream in pieces"
    assert not any(REPLACEMENT in d for d in deltas), deltas
    assert "".join(deltas) == row.answer() == text


def test_a_stop_string_split_over_tokens_never_shows(tokenizer: Any):
    row, deltas = stream(tokenizer, ids(tokenizer, "Use wax. [INST] and more"))
    assert row.stopped
    assert "".join(deltas) == row.answer() == "Use wax."
    assert not any("[" in d for d in deltas), deltas


def test_the_start_of_a_stop_string_that_never_completes_is_shown_at_the_end(tokenizer: Any):
    row = RowText(tokenizer, STOPS)
    deltas = []
    for token in ids(tokenizer, "Price [IN"):
        row.add(token)
        deltas.append(row.take_new(final=False))
    assert "".join(deltas) == "Price", "the possible stop string is held back while it may complete"
    row.finish()
    assert row.take_new(final=True) == " [IN"
    assert row.answer() == "Price [IN"


def test_the_answer_starts_at_its_first_visible_character(tokenizer: Any):
    row, deltas = stream(tokenizer, ids(tokenizer, " \n  Wax it. \n"))
    assert deltas[0].startswith("W")
    assert "".join(deltas) == row.answer() == "Wax it."


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=1022), max_size=40))
def test_streamed_text_adds_up_to_decoding_everything_at_once(tokenizer: Any, token_ids: list[int]):
    """Whatever the tokens — special, partial characters, stop strings — the stream is the
    answer, and the answer is what decoding all the tokens at once gives, less the replacement
    characters a decoder writes for bytes that make no character."""
    row, deltas = stream(tokenizer, token_ids)
    fed = row.tokens
    whole = tokenizer.decode(fed, skip_special_tokens=True).replace(REPLACEMENT, "")
    assert "".join(deltas) == row.answer()
    assert row.answer() == strip_stop_strings(whole, STOPS)
    assert not any(REPLACEMENT in d for d in deltas)
