"""The OpenAI chat protocol as this API speaks it: request validation and error bodies.

Kept apart from the routes so the wire format can be read (and tested) on its
own, as vLLM keeps its protocol models apart from its serving code.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from bot.serving.engine import (
    Message,
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
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=self.headers)


@dataclass(frozen=True)
class ChatRequest:
    """A validated ``/v1/chat/completions`` request."""

    model: str
    variant: Variant
    messages: list[Message]
    max_tokens: int | None
    stream: bool
    include_usage: bool


def model_names(engine_settings: EngineSettings | None = None) -> dict[str, Variant]:
    """Every model name the API answers to.

    ``base`` and ``finetuned`` always; also the names an
    :class:`~bot.serving.openai_engine.OpenAIEngine` is configured to ask a vLLM server
    for, so a bot set up for vLLM works unchanged against this API.
    """
    names: dict[str, Variant] = {"base": "base", "finetuned": "finetuned"}
    if engine_settings is not None:
        names.setdefault(engine_settings.base_model_name, "base")
        names.setdefault(engine_settings.base_model, "base")
        names.setdefault(engine_settings.finetuned_model_name, "finetuned")
    return names


def parse_chat_request(
    body: Any, *, models: Mapping[str, Variant], max_tokens_cap: int
) -> ChatRequest:
    """Check a decoded request body; every problem names the offending field."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: use 'base' or 'finetuned'.", param="model")
    if model not in models:
        raise ApiError(
            404,
            f"The model {model!r} does not exist: use one of {', '.join(sorted(models))}.",
            param="model",
            code="model_not_found",
        )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, "'max_tokens' must be a positive integer.", param="max_tokens")
        if max_tokens > max_tokens_cap:
            raise ApiError(
                400,
                f"'max_tokens' is {max_tokens}; this server allows at most {max_tokens_cap}.",
                param="max_tokens",
            )
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, "Only 'n': 1 is supported.", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false.", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object.", param="stream_options")
    return ChatRequest(
        model=model,
        variant=models[model],
        messages=_parse_messages(body.get("messages")),
        max_tokens=max_tokens,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


def _parse_messages(raw: Any) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list.", param="messages")
    messages: list[Message] = []
    for index, item in enumerate(raw):
        param = f"messages[{index}]"
        if not isinstance(item, dict):
            raise ApiError(
                400, f"{param} must be an object with 'role' and 'content'.", param=param
            )
        role_name = item.get("role")
        role = ROLES.get(role_name) if isinstance(role_name, str) else None
        if role is None:
            raise ApiError(
                400,
                f"{param}.role must be 'system', 'user' or 'assistant'.",
                param=f"{param}.role",
            )
        messages.append(Message(role=role, content=_text_content(item.get("content"), param)))
    return messages


def _text_content(content: Any, param: str) -> str:
    """A message's text: a string, or OpenAI's list of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        return "".join(part["text"] for part in content)
    raise ApiError(
        400, f"{param}.content must be a string (text parts only).", param=f"{param}.content"
    )
