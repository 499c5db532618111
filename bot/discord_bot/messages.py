"""Text shaping between the model and Discord: splitting long answers and building context.

Pure functions, no discord.py and no torch, so the rules that users notice
(a word or a code block is never cut in half; the oldest context goes first)
are tested on their own, and the worker and the bot trim context the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from bot.serving.context import trim_oldest_first
from bot.serving.engine import Message

if TYPE_CHECKING:
    from crawl.search import Passage

DISCORD_MESSAGE_LIMIT = 2000
FENCE = "```"
# The line that starts an answer's sources; what follows it is not the model's text.
SOURCES_MARK = "-# Sources:"
MAX_SOURCES = 3
SOURCE_TITLE_CHARS = 80
SOURCE_EXCERPT_CHARS = 160


def split_message(text: str, limit: int = DISCORD_MESSAGE_LIMIT) -> list[str]:
    """Split ``text`` into parts of at most ``limit`` characters for Discord.

    Cuts at the last paragraph break, else line break, else space before the
    limit, so no word is cut unless it alone is longer than a message. A code
    block that has to be cut is closed at the end of one part and reopened
    (with its language) at the start of the next, so every part renders.
    """
    if limit < 20:
        raise ValueError("limit must leave room for code fences")
    text = text.strip()
    parts: list[str] = []
    reopen = ""  # the fence line to restart an open code block with, if any
    while text:
        budget = limit - len(reopen)
        if len(text) <= budget:
            parts.append(reopen + text)
            break
        # Reserve room to close a code block that is open at the cut.
        cut = _cut_point(text, budget - len(FENCE) - 1)
        head, text = text[:cut].rstrip(), text[cut:].lstrip()
        if not head:  # nothing but whitespace before the cut: drop it
            continue
        fence = _open_fence(reopen + head)
        parts.append(reopen + head + ("\n" + FENCE if fence is not None else ""))
        reopen = (fence + "\n") if fence is not None else ""
    return parts


def _cut_point(text: str, budget: int) -> int:
    """Where to end a part of at most ``budget`` characters: the last break that is not inside a word."""
    window = text[: budget + 1]  # a break right at the limit still counts
    for separator in ("\n\n", "\n", " "):
        index = window.rfind(separator)
        if index > 0:
            return index
    return budget  # one word longer than a message: cutting it is the only way


_FENCE_LINE = re.compile(r"^```(\S*)", re.MULTILINE)


def _open_fence(text: str) -> str | None:
    """The opening fence (with its language) of a code block left open at the end of ``text``."""
    opened: str | None = None
    for match in _FENCE_LINE.finditer(text):
        opened = match.group(0) if opened is None else None
    return opened


@dataclass(frozen=True)
class ChainMessage:
    """One message of a Discord reply chain, as the model should see it."""

    from_bot: bool
    content: str


def chain_to_messages(chain: Iterable[ChainMessage], *, max_chars: int) -> list[Message]:
    """Turn a reply chain (oldest first) into a chat the Mistral template accepts.

    The template wants user/assistant turns alternating and starting with the
    user, so consecutive messages of one side are joined and a leading bot
    message is dropped; then the oldest turns go first until the rest fits in
    ``max_chars`` (the worker trims again, exactly, in tokens).
    """
    turns: list[Message] = []
    for message in chain:
        content = (strip_sources(message.content) if message.from_bot else message.content).strip()
        if not content:
            continue
        role: Literal["user", "assistant"] = "assistant" if message.from_bot else "user"
        if turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": turns[-1]["content"] + "\n\n" + content}
        else:
            turns.append({"role": role, "content": content})
    while turns and turns[0]["role"] != "user":
        turns.pop(0)
    while turns and turns[-1]["role"] != "user":  # the newest turn is the question
        turns.pop()
    return trim_oldest_first(turns, lambda kept: sum(len(m["content"]) for m in kept) <= max_chars)


def sources_block(passages: Sequence[Passage], limit: int = DISCORD_MESSAGE_LIMIT) -> str:
    """Up to three sources: a link titled by the thread, and the passage's quoted excerpt.

    Links are ``<…>``-wrapped so Discord shows no preview (no foreign images);
    each source is dropped whole rather than cut, so the block fits ``limit``.
    """
    lines = [SOURCES_MARK]
    for number, passage in enumerate(passages[:MAX_SOURCES], 1):
        title = _link_text(passage.title)
        entry = f"{number}. [{title}](<{passage.url}>)"
        quote = _shorten(" ".join(passage.excerpt.split()), SOURCE_EXCERPT_CHARS)
        if quote:
            entry += f"\n> {_escape(quote)}"
        if len("\n".join([*lines, entry])) > limit:
            break
        lines.append(entry)
    return "\n".join(lines) if len(lines) > 1 else ""


def with_sources(parts: list[str], block: str, limit: int = DISCORD_MESSAGE_LIMIT) -> list[str]:
    """``parts`` with ``block`` under the last one, or in a part of its own when it does not fit."""
    if not block:
        return parts
    if parts and len(parts[-1]) + 2 + len(block) <= limit:
        return [*parts[:-1], f"{parts[-1]}\n\n{block}"]
    return [*parts, block]


def strip_sources(text: str) -> str:
    """A bot message without its sources block: what the model said, for the reply chain."""
    head, mark, _ = text.partition(SOURCES_MARK)
    return head.rstrip() if mark else text


def _link_text(title: str) -> str:
    """A thread title safe inside ``[…]``: no brackets, no markdown, at most 80 characters."""
    flat = " ".join(title.replace("[", "(").replace("]", ")").split()) or "forum thread"
    return _escape(_shorten(flat, SOURCE_TITLE_CHARS))


def _escape(text: str) -> str:
    """Markdown and link syntax shown as typed (a quote is the forum's text, not ours)."""
    return re.sub(r"([\\*_`~|\[\]])", r"\\\1", text)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def strip_mentions_of(text: str, user_id: int) -> str:
    """The question without the ``<@id>`` / ``<@!id>`` that addressed the bot."""
    return re.sub(rf"<@!?{user_id}>", "", text).strip()
