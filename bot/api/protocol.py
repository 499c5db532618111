"""The OpenAI chat protocol as this API speaks it: typed request and response bodies, error bodies.

Kept apart from the routes so the wire format can be read (and tested) on its
own, as vLLM keeps its protocol models apart from its serving code. Requests
are validated by pydantic models with the ranges OpenAI documents
(``temperature`` 0–2, ``top_p`` above 0 up to 1, at most four ``stop``
strings); every problem becomes one 400 whose ``param`` names the field, as
OpenAI's own errors do. Fields this API does not use (``user``, ``logprobs``…)
are accepted and ignored, so clients written for OpenAI or vLLM work unchanged.

Sampling is the request's: ``temperature``, ``top_p``, ``seed``, ``stop`` and
vLLM's ``repetition_penalty`` extension become the engine's
:class:`~bot.serving.engine.Sampling`, and what a request leaves out takes the
operator's settings. ``presence_penalty`` and ``frequency_penalty`` have no
equivalent in the engines: 0 (OpenAI's default) is accepted, any other value
is refused rather than silently ignored.

Whatever a client sends is answered with a 4xx, never a 500: a body nested
too deep or holding a number too long to read is refused by
:func:`decode_json_body`; a conversation must end with a user's message and
its text must be Unicode (a lone UTF-16 surrogate such as ``"\ud800"`` is valid
JSON but no tokenizer can encode it, so it is refused, not silently replaced:
the client learns its text was corrupt); and ``API_MAX_MESSAGES`` caps how many
messages one request may carry.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)
from pydantic_core import PydanticCustomError

from bot.feedback.leaderboard import HeadToHead
from bot.serving.adapters import BASE, FINETUNED, ServedModels
from bot.serving.context import ConversationError, lone_surrogate_at, normalize_conversation
from bot.serving.engine import (
    MAX_STOP_STRINGS,
    Answer,
    FinishReason,
    Message,
    Sampling,
    Variant,
)
from bot.serving.settings import EngineSettings

log = logging.getLogger(__name__)

# OpenAI's newer "developer" role is what older servers call "system".
ROLES: Mapping[str, Literal["system", "user", "assistant"]] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}


class ApiError(Exception):
    """A request the API answers with an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type=type, param=param, code=code)
        self.headers = dict(headers or {})

    @classmethod
    def too_many(cls, message: str, *, code: str, wait_s: float) -> ApiError:
        """A 429 whose ``Retry-After`` is ``wait_s`` rounded up to whole seconds (at least 1)."""
        return cls(
            429,
            message,
            type="rate_limit_error",
            code=code,
            headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
        )

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=self.headers)


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """``{"error": {...}}`` as OpenAI sends it, in a response or as a stream event."""
    return ErrorBody(error=ErrorDetail(message=message, type=type, param=param, code=code)).dump()


# ---- requests ---------------------------------------------------------------------------


def decode_json_body(raw: bytes) -> Any:
    """A request body's JSON, or a 400 that says what is wrong with it.

    Python's parser raises more than ``JSONDecodeError`` on hostile input:
    ``RecursionError`` for deep nesting (``[`` × 60,000) and ``ValueError`` for
    an integer of more than 4,300 digits. Each is the client's mistake.
    """
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "The request body nests arrays or objects too deeply.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, f"The request body is not valid JSON: {error}.") from None
    except ValueError:  # an integer too long to convert
        raise ApiError(400, "The request body holds a number too long to read.") from None


class _Model(BaseModel):
    # Unknown fields (other OpenAI options, vLLM extensions) are ignored, not refused.
    model_config = ConfigDict(extra="ignore", frozen=True)


class TextPart(_Model):
    type: Literal["text"]
    text: StrictStr


def _as_one_error(message: str) -> Callable[[Any, ValidatorFunctionWrapHandler], Any]:
    """A union whose failure is one error with ``message``, not one per member type."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid_type", message) from None

    return validate


Content = Annotated[
    StrictStr | list[TextPart],
    WrapValidator(_as_one_error("must be a string or a list of {'type': 'text', 'text': …} parts")),
]
Stop = Annotated[
    StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP_STRINGS)],
    WrapValidator(
        _as_one_error(f"must be a string or a list of at most {MAX_STOP_STRINGS} strings")
    ),
]
Number = Annotated[float, Field(strict=True)]  # a JSON number; "0.7" (a string) is refused


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: Content

    def message(self) -> Message:
        """The engine's form: one role of three, the text parts joined."""
        content = self.content
        text = content if isinstance(content, str) else "".join(part.text for part in content)
        return Message(role=ROLES[self.role], content=text)


class StreamOptions(_Model):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Model):
    """The body of ``POST /v1/chat/completions``.

    Validated with a context of ``models`` (the names this API answers to) and
    ``max_tokens_cap`` (``API_MAX_TOKENS``), so an unknown model and too long
    an answer are reported like every other field.
    """

    model: StrictStr = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    n: Literal[1] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # This request's sampling; what it leaves out (None) takes the operator's settings.
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    stop: Stop | None = None
    # The range torch's generators take, so no seed fails only once it reaches the model.
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**64)
    # Extension (vLLM's): above 1 makes tokens already in the conversation less likely.
    repetition_penalty: Number | None = Field(None, gt=0)
    # No engine has these: 0, OpenAI's default, is all this API takes (see the validator).
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    user: StrictStr | None = None
    # Extension: false answers without the forum's passages (FORUM_DB), e.g. to evaluate.
    grounding: StrictBool = True

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str, info: ValidationInfo) -> str:
        models = (info.context or {}).get("models")
        if models is not None and model not in models:
            raise PydanticCustomError(
                "model_not_found",
                "'{model}' does not exist: use one of {names}",
                {"model": model, "names": ", ".join(sorted(models))},
            )
        return model

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise PydanticCustomError(
                "unsupported",
                "{value} is not supported (only 0 is): use 'repetition_penalty' instead, "
                "above 1 to make repeats less likely",
                {"value": value},
            )
        return value

    def sampling(self) -> Sampling:
        """The engine's form of this request's sampling fields."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=stop,
        )

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _within_cap(cls, value: int | None, info: ValidationInfo) -> int | None:
        cap = (info.context or {}).get("max_tokens_cap")
        if value is not None and cap is not None and value > cap:
            raise PydanticCustomError(
                "too_large",
                "{value} is more than this server allows (at most {cap})",
                {"value": value, "cap": cap},
            )
        return value


@dataclass(frozen=True)
class ChatRequest:
    """A validated ``/v1/chat/completions`` request, in the engine's terms."""

    model: str
    variant: Variant
    messages: list[Message]
    max_tokens: int | None
    stream: bool
    include_usage: bool
    grounding: bool = True
    sampling: Sampling = field(default_factory=Sampling)


def model_names(
    served: ServedModels, engine_settings: EngineSettings | None = None
) -> dict[str, Variant]:
    """Every model name the API answers to now, and the served name each one asks the engine for.

    The engine's names (``base``, ``finetuned`` while an adapter is the
    default, every adapter's own name), read on each request since adapters
    come and go at runtime; also the names an
    :class:`~bot.serving.openai_engine.OpenAIEngine` is configured to ask a vLLM server
    for, so a bot set up for vLLM works unchanged against this API.
    """
    names: dict[str, Variant] = {name: name for name in served.names}
    if engine_settings is not None:
        aliases = {
            engine_settings.base_model_name: BASE,
            engine_settings.base_model: BASE,
            engine_settings.finetuned_model_name: FINETUNED,
        }
        for alias, name in aliases.items():
            if name in names:
                names.setdefault(alias, name)
    return names


def parse_chat_request(
    body: Any,
    *,
    models: Mapping[str, Variant],
    max_tokens_cap: int,
    max_messages: int | None = None,
) -> ChatRequest:
    """Check a decoded request body; the first problem is raised, naming the offending field."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    sent = body.get("messages")
    if max_messages is not None and isinstance(sent, list) and len(sent) > max_messages:
        raise ApiError(
            400,
            f"'messages': {len(sent)} messages are more than this server takes (at most "
            f"{max_messages}): send only the latest turns.",
            param="messages",
        )
    try:
        request = ChatCompletionRequest.model_validate(
            body, context={"models": models, "max_tokens_cap": max_tokens_cap}
        )
    except ValidationError as invalid:
        raise _first_problem(invalid) from None
    options = request.stream_options or StreamOptions()
    messages = [message.message() for message in request.messages]
    for index, message in enumerate(messages):
        at = lone_surrogate_at(message["content"])
        if at is not None:
            raise ApiError(
                400,
                f"'messages[{index}].content' holds a lone UTF-16 surrogate at character {at}, "
                "which is not text: send valid Unicode.",
                param=f"messages[{index}].content",
            )
    turns = [message for message in messages if message["role"] != "system"]
    if turns and turns[-1]["role"] != "user":
        raise ApiError(
            400,
            "'messages' must end with a user message: the last turn is the question to answer.",
            param="messages",
        )
    try:  # the engines normalize the rest (repeated roles, extra system messages)
        normalize_conversation(messages)  # type: ignore[arg-type]
    except ConversationError:
        raise ApiError(
            400, "'messages' must include a user message to answer.", param="messages"
        ) from None
    return ChatRequest(
        model=request.model,
        variant=models[request.model],
        messages=messages,
        max_tokens=request.max_completion_tokens or request.max_tokens,
        stream=request.stream,
        include_usage=options.include_usage,
        grounding=request.grounding,
        sampling=request.sampling(),
    )


def _first_problem(invalid: ValidationError) -> ApiError:
    problem = invalid.errors(include_url=False)[0]
    param = "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in problem["loc"]
    ).lstrip(".")
    if problem["type"] == "model_not_found":
        return ApiError(404, f"The model {problem['msg']}.", param=param, code="model_not_found")
    message = "must be an object" if problem["type"] == "model_type" else problem["msg"]
    if param == "model" and problem["type"] in ("missing", "string_too_short"):
        message = "is required: use a name GET /v1/models lists, such as 'base'"
    return ApiError(400, f"'{param}': {message}." if param else f"{message}.", param=param or None)


def _unset(value: object) -> bool:
    return value is None


# ---- runtime adapter updates (vLLM's LoRA routes) -------------------------------------


class LoadLoraAdapterRequest(_Model):
    """The body of ``POST /v1/load_lora_adapter``, as vLLM takes it.

    ``lora_path`` is a directory holding an adapter (``adapter_config.json``
    and its weights), absolute or relative to the server's working directory.
    """

    lora_name: StrictStr = Field(min_length=1)
    lora_path: StrictStr = Field(min_length=1)


M = TypeVar("M", bound=BaseModel)


class LoraNameRequest(_Model):
    """The body of ``POST /v1/unload_lora_adapter`` and ``POST /v1/set_default_adapter``."""

    lora_name: StrictStr = Field(min_length=1)


def parse_body(shape: type[M], body: Any) -> M:
    """``body`` as ``shape``; the first problem is a 400 naming its field."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        return shape.model_validate(body)
    except ValidationError as invalid:
        raise _first_problem(invalid) from None


class VersusBase(BaseModel):
    """An adapter's results against ``base`` in the community's votes (the leaderboard's row).

    A tie counts half a win; "both bad" is counted but left out of the win rate.
    """

    wins: int
    losses: int
    ties: int
    both_bad: int
    win_rate: float | None
    interval_95: tuple[float, float] | None  # Wilson score interval of the win rate

    @classmethod
    def of(cls, h: HeadToHead) -> VersusBase:
        interval = h.interval
        return cls(
            wins=h.wins,
            losses=h.losses,
            ties=h.ties,
            both_bad=h.both_bad,
            win_rate=h.win_rate,
            interval_95=(interval.low, interval.high) if interval is not None else None,
        )


class AdapterCard(BaseModel):
    """One served adapter: its name, where it was read, its weights' hash, whether it is the default."""

    object: Literal["lora_adapter"] = "lora_adapter"
    lora_name: str
    lora_path: str
    weights_hash: str | None
    default: bool
    # GET /v1/adapters with a feedback store: its results against base (None: no votes yet).
    vs_base: VersusBase | None = Field(None, exclude_if=_unset)


class AdapterList(BaseModel):
    """What the adapter routes answer with: the adapters served after the change."""

    object: Literal["list"] = "list"
    default: str | None  # the adapter behind "finetuned"
    data: list[AdapterCard]

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def adapters_body(
    served: ServedModels, vs_base: Mapping[str, HeadToHead] | None = None
) -> dict[str, Any]:
    """The served adapters, the default marked, as every adapter route answers; with
    ``vs_base`` (the leaderboard's rows by name), each one's results against base."""
    cards = [
        AdapterCard(
            lora_name=adapter.name,
            lora_path=adapter.path,
            weights_hash=adapter.weights_hash,
            default=adapter.name == served.default,
            vs_base=VersusBase.of(vs_base[adapter.name])
            if vs_base is not None and adapter.name in vs_base
            else None,
        )
        for adapter in served.adapters
    ]
    return AdapterList(default=served.default, data=cards).dump()


# ---- responses --------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, answer: Answer) -> Usage:
        total = answer.prompt_tokens + answer.completion_tokens
        return cls(
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            total_tokens=total,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason


class SourceRef(BaseModel):
    """One forum passage an answer was grounded on (an extension: ``sources``)."""

    title: str
    url: str
    thread_id: str
    post_id: str
    excerpt: str
    score: float

    @classmethod
    def of(cls, answer: Answer) -> list[SourceRef]:
        return [
            cls(
                title=p.title,
                url=p.url,
                thread_id=p.thread_id,
                post_id=p.post_id,
                excerpt=p.excerpt,
                score=p.score,
            )
            for p in answer.sources
        ]


class ChatCompletion(BaseModel):
    """The answer to a request without ``stream``."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    sources: list[SourceRef] = Field(default_factory=list)  # extension: empty when ungrounded

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Delta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_unset)
    content: str | None = Field(None, exclude_if=_unset)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_unset)  # only in the final usage chunk
    # Extension: the answer's forum sources, on the finishing chunk and the usage chunk.
    sources: list[SourceRef] | None = Field(None, exclude_if=_unset)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "freeski-bot"
    root: Variant  # the served name that answers under this one (an alias's target)
    # vLLM's field: the model an adapter is applied to ("base"); None for the base itself.
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---- response bodies, as the routes send them ---------------------------------------------


def completion_body(completion_id: str, model: str, answer: Answer) -> dict[str, Any]:
    """The whole answer to a request without ``stream``."""
    choice = Choice(
        message=AssistantMessage(content=answer.text), finish_reason=answer.finish_reason
    )
    return ChatCompletion(
        id=completion_id,
        created=int(time.time()),
        model=model,
        choices=[choice],
        usage=Usage.of(answer),
        sources=SourceRef.of(answer),
    ).dump()


@dataclass(frozen=True)
class ChunkStream:
    """The chunks of one streamed answer: same id, creation time and model on each."""

    completion_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def first(self) -> dict[str, Any]:
        """The opening chunk: who speaks, no text yet."""
        return self._chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])

    def text(self, piece: str) -> dict[str, Any]:
        return self._chunk([ChunkChoice(delta=Delta(content=piece))])

    def finish(self, reason: FinishReason, answer: Answer | None = None) -> dict[str, Any]:
        """The chunk with ``finish_reason``; with ``answer``, its ``sources`` too."""
        sources = SourceRef.of(answer) if answer is not None else None
        return self._chunk([ChunkChoice(delta=Delta(), finish_reason=reason)], sources=sources)

    def usage(self, answer: Answer) -> dict[str, Any]:
        """The final chunk ``stream_options.include_usage`` asks for: no choices, the usage."""
        return self._chunk([], usage=Usage.of(answer), sources=SourceRef.of(answer))

    def _chunk(
        self,
        choices: list[ChunkChoice],
        usage: Usage | None = None,
        sources: list[SourceRef] | None = None,
    ) -> dict[str, Any]:
        return ChatCompletionChunk(
            id=self.completion_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
            sources=sources,
        ).dump()


def models_body(
    served: ServedModels, models: Mapping[str, Variant], created: int
) -> dict[str, Any]:
    """``GET /v1/models``: every name the API answers to, and which served name answers it.

    ``root`` is the adapter behind an alias (``finetuned``'s is the default
    adapter); ``parent`` is ``base`` for every adapter, as vLLM lists LoRA modules.
    """

    def root(variant: Variant) -> str:
        return served.default or variant if variant == FINETUNED else variant

    cards = [
        ModelCard(
            id=name,
            created=created,
            root=root(variant),
            parent=None if variant == BASE else BASE,
        )
        for name, variant in models.items()
    ]
    return ModelList(data=cards).dump()
