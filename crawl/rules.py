"""Which replies are answers, and their answer text: the one judgement the dataset and the index share.

A passage the bot shows as a source must be a text the finetune could have
trained on, cleaned the same way: never a deleted post, an edit notice, a bare
link, the asker's own "thanks!". Both ``crawl dataset`` and the search index
ask :func:`judge_reply`, so the two can never drift apart. The rules that need
the whole store (copypasta across threads, duplicates of an earlier answer) are
applied by each reader on top: the dataset in its passes, the index at query
time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from crawl.clean import Cleaned, clean_text, content_drop, normalise, repeats
from crawl.store import StoredPost

MIN_ANSWER_CHARS = 20
MAX_CHARS = 4000


@dataclass(frozen=True)
class Verdict:
    """A reply judged: the rule that drops it (``None`` when it is an answer) and its clean text."""

    reason: str | None
    text: str
    edits: tuple[str, ...] = ()


def clean_post(post: StoredPost) -> Cleaned:
    """A post's text as training sees it: the quotes and signature the parser took out count too."""
    return clean_text(post.text, quotes=len(post.quotes), signature=post.signature)


def text_key(text: str) -> bytes:
    """A short digest of the near-duplicate key: a whole store's worth fits in memory."""
    return hashlib.blake2b(normalise(text).encode(), digest_size=16).digest()


def thread_prompt(title: str, opening: StoredPost) -> str:
    """The question a thread asks, as a dataset row's prompt starts: its title, then its opening post."""
    question = "" if opening.deleted else clean_post(opening).text
    title = clean_text(title).text  # a title can carry [INST] or bbcode too
    return f"{title}\n\n{question}" if question else title


def judge_reply(
    reply: StoredPost,
    *,
    prompt: str,
    opening: StoredPost,
    min_chars: int = MIN_ANSWER_CHARS,
    max_chars: int = MAX_CHARS,
    is_copypasta: Callable[[str], bool] | None = None,
) -> Verdict:
    """Judge ``reply`` to the thread that ``opening`` starts and ``prompt`` asks.

    The rules run in the order ``stats.json`` lists them; ``is_copypasta`` slots
    the store-wide copypasta rule into its place in that order.
    """
    if reply.deleted:
        return Verdict("deleted", "")
    cleaned = clean_post(reply)
    text, edits = cleaned.text, tuple(cleaned.edits)
    reason = content_drop(cleaned)
    if reason is None and len(text) < min_chars:
        reason = "too_short"
    if reason is None and len(text) > max_chars:
        reason = "too_long"
    if reason is None and is_copypasta is not None and is_copypasta(text):
        reason = "copypasta"
    if reason is None and repeats(text, prompt):
        reason = "repeats_question"
    if reason is None and opening.author and reply.author == opening.author:
        reason = "by_question_author"  # follow-ups and thanks from the asker are not answers
    return Verdict(reason, text, edits)
