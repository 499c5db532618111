"""The one interface everything that answers goes through.

The Discord layer, the console chat, the HTTP API and the demo talk to an
:class:`Engine` and never to torch: :class:`bot.serving.local_engine.LocalEngine`
serves from the quantized model on this machine, and
:class:`bot.serving.openai_engine.OpenAIEngine` from any OpenAI-compatible server
(vLLM with the adapter loaded as a LoRA module, or another Freeski bot's API).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, TypedDict, runtime_checkable

from bot.serving.adapters import BASE, FINETUNED, ServedAdapter, ServedModels

if TYPE_CHECKING:
    from crawl.search import Passage

# A served model's name: "base", "finetuned" (the default adapter) or an adapter's own name
# (bot/serving/adapters.py). Requests pick one; answers say which they were asked of.
Variant = str
# The two names every engine with an adapter answers to: /compare's default pair.
VARIANTS: tuple[Variant, Variant] = (BASE, FINETUNED)
MAX_STOP_STRINGS = 4  # per request, as the OpenAI API allows
# How an answer ended: by itself, at its token budget, or stopped (shutdown, caller gone).
FinishReason = Literal["stop", "length", "cancelled"]


class Message(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


# Called on the event loop with each newly generated piece of text (a delta).
OnText = Callable[[str], None]


def stream_for(on_text: Callable[[Variant, str], None] | None, variant: Variant) -> OnText | None:
    """One model's ``on_text`` out of ``compare``'s two-model callback."""
    if on_text is None:
        return None
    return lambda delta: on_text(variant, delta)


# The most stop strings one request may carry: OpenAI's limit, so a request this API takes
# can be passed on to any OpenAI-compatible server.
MAX_STOP_STRINGS = 4


@dataclass(frozen=True)
class Sampling:
    """How one request samples; a field left ``None`` takes the engine's configured value.

    Per request, because the HTTP API takes them per request; the local
    worker applies them per row of a shared batch, so two users' settings
    never mix. ``temperature=0`` is greedy. A ``seed`` makes a sampled answer
    repeatable: the same seed gives the same answer alone or in any batch.
    ``stop`` ends the answer before the first of these strings (the operator
    sets none, so it is the request's alone).
    """

    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    # Text that ends the answer and is never shown (OpenAI's `stop`), beside the template's.
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature is not None and not self.temperature >= 0:
            raise ValueError(f"temperature {self.temperature} must be 0 (greedy) or more")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p {self.top_p} must be above 0 and at most 1")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty {self.repetition_penalty} must be above 0")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(self.stop)} stop strings: at most {MAX_STOP_STRINGS} are taken")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("a stop string must be non-empty text")


@dataclass(frozen=True)
class Answer:
    """One finished answer and what it cost."""

    text: str
    variant: Variant  # the name it was asked of ("finetuned" stays "finetuned")
    finish_reason: FinishReason = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float = 0.0  # waiting for a batch slot
    first_token_s: float | None = None  # request accepted → first text
    total_s: float = 0.0  # request accepted → answer complete
    # The forum passages the answer was grounded on (FORUM_DB), best first; shown as its sources.
    sources: tuple[Passage, ...] = ()
    # The adapter that wrote it (the default's, for "finetuned"); None for the base model.
    adapter: ServedAdapter | None = None


@dataclass(frozen=True)
class EngineStatus:
    """What ``/status`` shows and what the metrics endpoint exports."""

    backend: str
    model: str
    adapter: str | None
    device: str
    ready: bool
    queue_depth: int
    queue_size: int
    max_batch: int
    batches_served: int
    requests_served: int
    tokens_generated: int
    tokens_per_s: float  # over the recent window
    uptime_s: float
    # Whether answers are grounded on the forum (FORUM_DB), and if not why: one line for /status.
    grounding: str = "off: FORUM_DB is not set"
    # The answering loop's own state, from its heartbeat: "ok", "stalled" (busy but no
    # step for WORKER_STALL_S), "failing" (its last steps all raised) or "stopped".
    worker: str = "ok"
    heartbeat_age_s: float | None = None  # since the loop last went round; None without one


class EngineError(Exception):
    """A request failed; the message is safe and useful to show the asking user."""


class EngineBusy(EngineError):
    """The queue is full: try again later. Carries a hint for ``Retry-After``."""

    def __init__(self, retry_after_s: float, message: str | None = None) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message or f"I'm busy right now, try again in {retry_after_s:.0f} s.")


class RequestTooLong(EngineError):
    """The prompt with its answer cannot fit: the asker must shorten it (an HTTP 400, not a 500)."""


class InvalidRequest(EngineError):
    """This request cannot be answered as sent (a conversation that does not end with a
    question, text the tokenizer refuses): the asker's to fix, an HTTP 400. Other requests
    are not affected."""


class EngineRejected(InvalidRequest):
    """The inference server refused the request as sent (an HTTP 4xx): retrying cannot help.

    The API answers it with a 400, as the server did, never a 500.
    """


class UnknownModel(InvalidRequest):
    """No model is served under the name asked (vLLM's 404 ``model_not_found``)."""


class AdapterRejected(InvalidRequest):
    """An adapter cannot be loaded, unloaded or made the default as asked: not an adapter,
    trained on another base, a name taken or not allowed, the default unloaded, too many
    adapters. The message says which and how to fix it (an HTTP 400)."""


class RuntimeUpdatesUnsupported(InvalidRequest):
    """This engine cannot change its adapters while it runs (an OpenAI-compatible server's
    adapters are that server's to load)."""


class EngineTimeout(EngineError):
    """The request was not answered before its deadline."""


class EngineUnavailable(EngineError):
    """The model or the inference server cannot be reached at all."""


@runtime_checkable
class Engine(Protocol):
    """Answers chat messages with the base model or one of its adapters, by name."""

    async def start(self) -> None:
        """Load the model / open connections; idempotent."""

    async def close(self) -> None:
        """Stop taking work, end in-flight requests, release the model."""

    async def generate(
        self,
        messages: Sequence[Message],
        *,
        variant: Variant = "finetuned",
        max_new_tokens: int | None = None,
        on_text: OnText | None = None,
        sampling: Sampling | None = None,
        grounding: bool = True,
    ) -> Answer:
        """Answer ``messages`` (oldest first) as model ``variant``, streaming through ``on_text``.

        ``variant`` is any name :meth:`models` lists; another is :class:`UnknownModel`.

        ``max_new_tokens`` can shorten the answer, never lengthen it past the
        engine's configured ``MAX_NEW_TOKENS``. ``sampling`` overrides the
        configured sampling for this request only. ``grounding=False`` answers
        without the forum's passages (an evaluation's opt-out); backends accept
        and ignore it, :class:`~bot.serving.grounding.GroundedEngine` acts on it.
        """

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
        """Two models' answers to the same messages, in ``models``' order (base, finetuned
        by default); ``on_text`` gets each delta with its model's name.

        Both rows sample with the same ``sampling`` (the same seed too), so the
        two answers differ by the adapter alone. Two equal names are an
        :class:`InvalidRequest`.
        """

    def status(self) -> EngineStatus:
        """A snapshot of the engine's health and counters; never blocks."""

    def models(self) -> ServedModels:
        """The names answered right now, the default adapter, each adapter's path and hash."""

    async def load_adapter(self, name: str, path: str | os.PathLike[str]) -> ServedAdapter:
        """Serve the adapter saved at ``path`` as ``name``; returns once it answers.

        Raises :class:`AdapterRejected` (not an adapter, another base, a name
        taken or invalid, too many) or :class:`RuntimeUpdatesUnsupported`.
        Answers in flight go on meanwhile, and no other model's answers change.
        """

    async def unload_adapter(self, name: str) -> None:
        """Stop serving ``name``: refused for new requests at once, gone once its running
        answers finished (they finish first). :class:`UnknownModel` if it is not served,
        :class:`AdapterRejected` for the default or a reserved name."""

    async def set_default(self, name: str) -> ServedModels:
        """Make adapter ``name`` the one ``finetuned`` answers with, from the next request on."""


def check_pair(models: tuple[Variant, Variant]) -> None:
    """``compare``'s pair must be two names: the same one twice would stream into one."""
    if models[0] == models[1]:
        raise InvalidRequest(f"compare asks two different models; both were {models[0]!r}")


class EngineWrapper:
    """The base of an engine that wraps another and changes some of what it does.

    Everything but answering is passed through as it is: starting, closing,
    the status and the served adapters. A wrapper overrides what it adds
    (``generate`` and ``compare`` always).
    """

    def __init__(self, inner: Engine) -> None:
        self.inner = inner

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    def status(self) -> EngineStatus:
        return self.inner.status()

    def models(self) -> ServedModels:
        return self.inner.models()

    async def load_adapter(self, name: str, path: str | os.PathLike[str]) -> ServedAdapter:
        return await self.inner.load_adapter(name, path)

    async def unload_adapter(self, name: str) -> None:
        await self.inner.unload_adapter(name)

    async def set_default(self, name: str) -> ServedModels:
        return await self.inner.set_default(name)
