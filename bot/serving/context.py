"""Shaping a conversation for the model: the operator's system prompt, and trimming to fit.

Every front end, the worker and the OpenAI-compatible engine use these, so
what the model sees of a long reply chain, and whether ``SYSTEM_PROMPT`` leads
it, does not depend on where the question came from or which backend answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bot.serving.engine import Message

# The one normalization of a conversation (roles merged, one system message first), shared
# with training and the templates; front ends reach it through here.
from finetune.chat import ConversationError, normalize_conversation

__all__ = [
    "ConversationError",
    "lone_surrogate_at",
    "normalize_conversation",
    "trim_oldest_first",
    "with_system_prompt",
]


def with_system_prompt(messages: Sequence[Message], system_prompt: str) -> list[Message]:
    """``messages`` led by the operator's ``SYSTEM_PROMPT``, unless it is empty or one leads already.

    A conversation that brings its own system message (an API client's) keeps
    it; applying this twice changes nothing, so a front end and an engine may
    both call it.
    """
    chat = list(messages)
    if system_prompt and (not chat or chat[0]["role"] != "system"):
        chat.insert(0, {"role": "system", "content": system_prompt})
    return chat


def trim_oldest_first(
    messages: Sequence[Message], fits: Callable[[list[Message]], bool]
) -> list[Message]:
    """Drop the oldest user/assistant exchanges until ``fits`` says the rest fits.

    A leading system message is always kept, and so is the last user turn (the
    question itself) even when it alone is too long: cutting the question is
    the caller's decision, not the context's. Turns go in pairs so the chat
    still starts with the user.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = list(messages[len(system) :])
    while len(turns) > 1 and not fits(system + turns):
        del turns[: 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1]
        while turns and turns[0]["role"] != "user":
            turns.pop(0)
    return system + turns


def lone_surrogate_at(text: str) -> int | None:
    """Where ``text`` holds a lone UTF-16 surrogate (valid JSON, ``"\\ud800"``, but not text), if anywhere.

    No tokenizer can encode one, so every front end refuses it before it is
    queued, and the worker again before it tokenizes.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None
