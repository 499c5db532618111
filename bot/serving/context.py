"""Shaping a conversation for the model: the operator's system prompt, and trimming to fit.

``SYSTEM_PROMPT`` is applied in one place, :class:`SystemPrompted`, the stage
:func:`~bot.serving.factory.build_engine` puts around every backend: front
ends pass the user's conversation only, so the local worker and an
OpenAI-compatible server are sent the same conversation whichever front end
asked. Trimming is shared by the worker and the Discord front end, so what the
model sees of a long reply chain does not depend on where the question came from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bot.serving.adapters import FINETUNED
from bot.serving.engine import (
    VARIANTS,
    Answer,
    Engine,
    EngineWrapper,
    Message,
    OnText,
    Sampling,
    Variant,
)

# The one normalization of a conversation (roles merged, one system message first), shared
# with training and the templates; front ends reach it through here.
from finetune.chat import ConversationError, normalize_conversation

__all__ = [
    "ConversationError",
    "SystemPrompted",
    "lone_surrogate_at",
    "normalize_conversation",
    "trim_oldest_first",
    "with_system_prompt",
]


def with_system_prompt(messages: Sequence[Message], system_prompt: str) -> list[Message]:
    """``messages`` led by the operator's ``SYSTEM_PROMPT``, unless it is empty or one leads already.

    A conversation that brings its own system message (an API client's) keeps
    it; applying this twice changes nothing.
    """
    chat = list(messages)
    if system_prompt and (not chat or chat[0]["role"] != "system"):
        chat.insert(0, {"role": "system", "content": system_prompt})
    return chat


class SystemPrompted(EngineWrapper):
    """An :class:`~bot.serving.engine.Engine` whose every conversation ``SYSTEM_PROMPT`` leads.

    The one owner of the operator's system prompt (see this module's
    docstring); everything else is passed through unchanged.
    """

    def __init__(self, inner: Engine, system_prompt: str) -> None:
        super().__init__(inner)
        self.system_prompt = system_prompt

    async def generate(
        self,
        messages: Sequence[Message],
        *,
        variant: Variant = FINETUNED,
        max_new_tokens: int | None = None,
        on_text: OnText | None = None,
        sampling: Sampling | None = None,
        grounding: bool = True,
    ) -> Answer:
        return await self.inner.generate(
            with_system_prompt(messages, self.system_prompt),
            variant=variant,
            max_new_tokens=max_new_tokens,
            on_text=on_text,
            sampling=sampling,
            grounding=grounding,
        )

    async def compare(
        self,
        messages: Sequence[Message],
        *,
        models: tuple[Variant, Variant] = VARIANTS,
        max_new_tokens: int | None = None,
        on_text: Callable[[Variant, str], None] | None = None,
        sampling: Sampling | None = None,
        grounding: bool = True,
    ) -> tuple[Answer, Answer]:
        return await self.inner.compare(
            with_system_prompt(messages, self.system_prompt),
            models=models,
            max_new_tokens=max_new_tokens,
            on_text=on_text,
            sampling=sampling,
            grounding=grounding,
        )


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
