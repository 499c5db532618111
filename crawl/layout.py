"""The one layout of a grounded question: [Question] | [Context], the model answers as [Response].

Training rows (``crawl dataset --context K``) and the serving core render a
question with its retrieved passages through :func:`render_question`, so the
model reads context at answer time exactly as it learned to. The layout's name
travels with the dataset and the run (``LAYOUT``); change the text below and
change the name with it, so an adapter trained on the old layout is not served
with the new one unawares.
"""

from __future__ import annotations

from collections.abc import Sequence

from crawl.search import Passage, clip

LAYOUT = "forum-context-v1"
CONTEXT_HEADING = "Forum posts that may help:"
PASSAGE_CHARS = 600  # per passage: a long post's first 600 characters carry its point


def render_question(
    question: str, passages: Sequence[Passage], *, passage_chars: int = PASSAGE_CHARS
) -> str:
    """``question`` followed by its context: each passage numbered, with its thread's title.

    The question leads, so a prompt cut for length loses context before it
    loses the question; no passages, the question alone (an ungrounded row).
    """
    if not passages:
        return question
    lines = [question.rstrip(), "", CONTEXT_HEADING]
    for number, passage in enumerate(passages, 1):
        who = passage.author or "someone"
        lines.append(f"[{number}] {passage.title} ({who}): {clip(passage.text, passage_chars)}")
    return "\n".join(lines)


def question_of(content: str) -> str:
    """The question a rendered prompt asks, without its context (the inverse of rendering)."""
    return content.split(f"\n\n{CONTEXT_HEADING}\n", 1)[0]
