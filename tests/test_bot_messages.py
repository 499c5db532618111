"""Splitting answers for Discord, reply chains as chats, and the per-user rate limit."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.discord_bot.messages import (
    ChainMessage,
    chain_to_messages,
    split_message,
    strip_mentions_of,
    trim_oldest_first,
)
from bot.serving.ratelimit import RateLimiter

words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz.,!?'", min_size=1, max_size=25)
separators = st.sampled_from([" ", " ", " ", "\n", "\n\n"])


@st.composite
def prose(draw, max_words: int = 300) -> str:
    items = draw(st.lists(st.tuples(words, separators), min_size=1, max_size=max_words))
    return "".join(word + sep for word, sep in items)


FENCE_LINE = re.compile(r"^```\S*$")


@given(text=prose(), limit=st.integers(min_value=60, max_value=400))
@settings(max_examples=150, deadline=None)
def test_split_keeps_every_word_whole_and_every_part_within_the_limit(text: str, limit: int):
    parts = split_message(text, limit)
    assert all(0 < len(part) <= limit for part in parts)
    assert " ".join(parts).split() == text.split()


@given(
    before=prose(60),
    code=st.lists(prose(8), min_size=1, max_size=40),
    after=prose(60),
    limit=st.integers(min_value=80, max_value=400),
)
@settings(max_examples=100, deadline=None)
def test_a_code_block_cut_in_two_is_closed_and_reopened(
    before: str, code: list[str], after: str, limit: int
):
    lines = [line.replace("\n", " ").strip() or "x" for line in code]
    text = before + "\n```python\n" + "\n".join(lines) + "\n```\n" + after
    parts = split_message(text, limit)
    assert all(len(part) <= limit for part in parts)
    for part in parts:
        fences = [line for line in part.splitlines() if FENCE_LINE.match(line.strip())]
        assert len(fences) % 2 == 0, f"unbalanced code fence in {part!r}"
    content = [line for p in parts for line in p.splitlines() if not FENCE_LINE.match(line)]
    original = [line for line in text.splitlines() if not FENCE_LINE.match(line)]
    assert " ".join(content).split() == " ".join(original).split()


def test_a_long_code_block_continues_with_its_language_in_the_next_part():
    code = "\n".join(f"edge_angle_{i} = {i}" for i in range(30))
    parts = split_message(f"Try this:\n```python\n{code}\n```", 200)
    assert len(parts) > 1
    assert parts[0].endswith("\n```")
    assert all(p.startswith("```python\n") for p in parts[1:])


def test_a_short_answer_is_one_part_and_a_giant_word_is_cut():
    assert split_message("  fresh snow  ") == ["fresh snow"]
    parts = split_message("x" * 450, 200)
    assert [len(p) for p in parts] == [196, 196, 58]


chains = st.lists(
    st.builds(ChainMessage, from_bot=st.booleans(), content=st.text(min_size=0, max_size=80)),
    min_size=1,
    max_size=15,
)


@given(chain=chains, max_chars=st.integers(min_value=1, max_value=600))
@settings(max_examples=200, deadline=None)
def test_a_reply_chain_becomes_an_alternating_chat_ending_with_the_question(
    chain: list[ChainMessage], max_chars: int
):
    messages = chain_to_messages(chain, max_chars=max_chars)
    if not any(not m.from_bot and m.content.strip() for m in chain):
        assert messages == []
        return
    roles = [m["role"] for m in messages]
    assert roles[0] == "user" and roles[-1] == "user"
    assert all(a != b for a, b in itertools.pairwise(roles))
    newest_question = next(
        m.content.strip() for m in reversed(chain) if not m.from_bot and m.content.strip()
    )
    assert messages[-1]["content"].endswith(newest_question)
    if len(messages) > 1:
        assert sum(len(m["content"]) for m in messages) <= max_chars


def test_trimming_drops_the_oldest_exchange_first_and_keeps_the_system_prompt():
    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "q3"},
    ]
    kept = trim_oldest_first(chat, lambda m: len(m) <= 4)
    assert [m["content"] for m in kept] == ["be brief", "q2", "a2", "q3"]
    only_question = trim_oldest_first(chat, lambda m: False)
    assert [m["content"] for m in only_question] == ["be brief", "q3"]


def test_chain_joins_consecutive_messages_and_drops_a_leading_bot_message():
    chain = [
        ChainMessage(True, "welcome!"),
        ChainMessage(False, "first"),
        ChainMessage(False, "second"),
        ChainMessage(True, "answer part 1"),
        ChainMessage(True, "answer part 2"),
        ChainMessage(False, "follow-up"),
    ]
    assert chain_to_messages(chain, max_chars=10_000) == [
        {"role": "user", "content": "first\n\nsecond"},
        {"role": "assistant", "content": "answer part 1\n\nanswer part 2"},
        {"role": "user", "content": "follow-up"},
    ]


def test_strip_mentions_of_the_bot_only():
    assert strip_mentions_of("<@42> <@!42>what wax? <@7>", 42) == "what wax? <@7>"


def test_rate_limit_allows_n_per_window_per_user():
    now = [0.0]
    limiter = RateLimiter(2, window_s=60, clock=lambda: now[0])
    assert limiter.acquire("ann") is None
    assert limiter.acquire("ann") is None
    assert limiter.acquire("ann") == pytest.approx(60)
    assert limiter.acquire("bob") is None, "limits are per user"
    now[0] = 30.0
    assert limiter.acquire("ann") == pytest.approx(30)
    now[0] = 60.0
    assert limiter.acquire("ann") is None
    assert RateLimiter(0).acquire("ann") is None, "0 turns the limit off"


def test_rate_limit_forgets_users_idle_for_a_window():
    now = [0.0]
    limiter = RateLimiter(2, window_s=60, clock=lambda: now[0])
    for user in range(100):
        limiter.acquire(user)
    now[0] = 61.0
    assert limiter.acquire("ann") is None
    assert len(limiter._hits) == 1, "the 100 idle users should be forgotten"
