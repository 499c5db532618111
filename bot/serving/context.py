"""Fitting a conversation into the model's window: the oldest turns go first.

Every front end and the worker trim the same way, so what the model sees of a
long reply chain does not depend on where the question came from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bot.serving.engine import Message


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
