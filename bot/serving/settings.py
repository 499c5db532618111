"""Engine and process settings, read once from the environment and ``.env``.

Everything is validated here, before torch is imported, so a bad value stops
the program with one line that names the variable. Secrets (API keys) are kept
out of ``repr`` and logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from bot.serving.adapters import FINETUNED, AdapterSpec, parse_adapters
from bot.serving.env import (
    env_bool,
    env_float,
    env_int,
    env_str,
    load_env_file,
)
from finetune.modeling import DEFAULT_BASE_MODEL
from freeski_common.errors import UserError

Backend = Literal["local", "openai"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)


# The non-OpenAI sampling fields the OpenAI engine knows how to send (vLLM's names).
SAMPLING_EXTENSIONS: tuple[str, ...] = ("repetition_penalty",)


def sampling_extensions_from_env() -> tuple[str, ...]:
    """``OPENAI_SAMPLING_EXTENSIONS``: a comma list of :data:`SAMPLING_EXTENSIONS`, or ``none``."""
    raw = env_str("OPENAI_SAMPLING_EXTENSIONS")
    if raw is None:
        return SAMPLING_EXTENSIONS
    names = tuple(n.strip().lower() for n in raw.split(",") if n.strip())
    if names in ((), ("none",)):
        return ()
    unknown = [n for n in names if n not in SAMPLING_EXTENSIONS]
    if unknown:
        raise UserError(
            f"OPENAI_SAMPLING_EXTENSIONS names {', '.join(unknown)}: use 'none' or any of "
            f"{', '.join(SAMPLING_EXTENSIONS)}"
        )
    return names


def metrics_port_from_env() -> int | None:
    """``METRICS_PORT``, shared by the bot and the API process; 0 or unset means off."""
    return env_int("METRICS_PORT", 0, minimum=0) or None


def metrics_host_from_env() -> str:
    """``METRICS_HOST``: where ``/metrics`` listens; loopback unless the operator opens it."""
    return env_str("METRICS_HOST", "127.0.0.1") or "127.0.0.1"


def log_level_from_env() -> LogLevel:
    level = (env_str("LOG_LEVEL", "INFO") or "INFO").upper()
    if level not in LOG_LEVELS:
        raise UserError(f"LOG_LEVEL={level!r} is unknown: use DEBUG, INFO, WARNING or ERROR")
    return level


@dataclass(frozen=True)
class EngineSettings:
    """What answers: the local single-GPU worker or an OpenAI-compatible server."""

    backend: Backend = "local"
    base_model: str = DEFAULT_BASE_MODEL
    # ADAPTER_PATH: one adapter, served as "finetuned". ADAPTERS: several, each by its own
    # name, DEFAULT_ADAPTER (else the first) also answering as "finetuned". Never both.
    adapter_path: Path | None = None
    adapters: tuple[AdapterSpec, ...] = ()
    default_adapter: str | None = None
    max_adapters: int = 8  # loaded at once, at start and at runtime
    load_in_4bit: bool = True
    max_batch: int = 8
    queue_size: int = 64
    batch_wait_ms: float = 5.0
    # Cache slots (tokens, padding included) the running batch may reserve: prompt + whole
    # answer per row, times the rows. 16,384 is about 2 GiB of fp16 keys/values for
    # Mistral-7B (128 KiB a token), what an 8 GB card has left beside the 4-bit weights.
    max_batch_tokens: int = 16384
    max_prefill_tokens: int = 2048  # prompt tokens prefilled between two decoding steps
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.15
    request_timeout_s: float = 120.0
    # A worker with work that has not gone round its loop for this long is "stalled" on
    # /healthz; above the slowest step (a full prefill) the hardware takes.
    worker_stall_s: float = 60.0
    system_prompt: str = ""
    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_api_key: str = field(default="", repr=False)
    base_model_name: str = "base"
    finetuned_model_name: str = "finetuned"
    # Grounding (bot/serving/grounding.py): the forum store whose passages answers are
    # grounded on, and how many; None k takes the adapter's grounding.json, else 3.
    forum_db: Path | None = None
    grounding_k: int | None = None
    # Sampling fields beyond OpenAI's own that the server takes (vLLM takes these; OpenAI
    # and `transformers serve` refuse them). The engine also drops one the server refuses.
    openai_sampling_extensions: tuple[str, ...] = SAMPLING_EXTENSIONS

    @property
    def adapter_specs(self) -> tuple[AdapterSpec, ...]:
        """The adapters to load at start, in order: ``ADAPTERS``, or ``ADAPTER_PATH`` as ``finetuned``."""
        if self.adapters:
            return self.adapters
        return (AdapterSpec(FINETUNED, self.adapter_path),) if self.adapter_path else ()

    @property
    def default_adapter_name(self) -> str | None:
        """The adapter behind the ``finetuned`` alias: ``DEFAULT_ADAPTER``, else the first."""
        specs = self.adapter_specs
        return self.default_adapter or (specs[0].name if specs else None)

    @property
    def default_adapter_path(self) -> Path | None:
        """Where the default adapter is read from (its run's records sit beside it)."""
        name = self.default_adapter_name
        return next((s.path for s in self.adapter_specs if s.name == name), None)

    @classmethod
    def from_env(cls) -> EngineSettings:
        load_env_file()
        backend = (env_str("INFERENCE_BACKEND", "local") or "local").lower()
        if backend not in BACKENDS:
            raise UserError(
                f"INFERENCE_BACKEND={backend!r} is unknown: use one of {', '.join(BACKENDS)}"
            )
        base_model = env_str("BASE_MODEL", DEFAULT_BASE_MODEL) or DEFAULT_BASE_MODEL
        if (
            backend == "local"
            and base_model.startswith((".", "/", "~"))
            and not Path(base_model).expanduser().exists()
        ):
            raise UserError(
                f"BASE_MODEL={base_model}: no such directory; point it at a model or use a Hugging Face id"
            )
        adapter = env_str("ADAPTER_PATH")
        adapter_path = Path(adapter).expanduser() if adapter else None
        adapters = _adapters_from_env(adapter_path)
        max_adapters = env_int("MAX_ADAPTERS", cls.max_adapters, minimum=1)
        if len(adapters) > max_adapters:
            raise UserError(
                f"ADAPTERS lists {len(adapters)} adapters, more than MAX_ADAPTERS={max_adapters}: "
                "serve fewer or raise MAX_ADAPTERS"
            )
        default_adapter = _default_adapter_from_env(adapters)
        if backend == "local":
            for spec in adapters or (
                (AdapterSpec(FINETUNED, adapter_path),) if adapter_path else ()
            ):
                if not (spec.path / "adapter_config.json").is_file():
                    variable = (
                        "ADAPTER_PATH" if spec.name == FINETUNED else f"ADAPTERS ({spec.name})"
                    )
                    raise UserError(
                        f"{variable}={spec.path}: no adapter_config.json there; point it at a "
                        "finetune run's adapter/ directory"
                    )
        temperature = env_float("TEMPERATURE", cls.temperature, minimum=0.0)
        top_p = env_float("TOP_P", cls.top_p, minimum=0.0)
        if top_p > 1.0:
            raise UserError(f"TOP_P={top_p} is too large: it must be between 0 and 1")
        return cls(
            backend=backend,
            base_model=base_model,
            adapter_path=adapter_path,
            adapters=adapters,
            default_adapter=default_adapter,
            max_adapters=max_adapters,
            load_in_4bit=env_bool("LOAD_IN_4BIT", cls.load_in_4bit),
            max_batch=env_int("MAX_BATCH", cls.max_batch, minimum=1),
            queue_size=env_int("QUEUE_SIZE", cls.queue_size, minimum=1),
            batch_wait_ms=env_float("BATCH_WAIT_MS", cls.batch_wait_ms, minimum=0.0),
            max_batch_tokens=env_int("MAX_BATCH_TOKENS", cls.max_batch_tokens, minimum=64),
            max_prefill_tokens=env_int("MAX_PREFILL_TOKENS", cls.max_prefill_tokens, minimum=1),
            max_new_tokens=env_int("MAX_NEW_TOKENS", cls.max_new_tokens, minimum=1),
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=env_float("REPETITION_PENALTY", cls.repetition_penalty, minimum=1.0),
            request_timeout_s=env_float("REQUEST_TIMEOUT_S", cls.request_timeout_s, minimum=1.0),
            worker_stall_s=env_float("WORKER_STALL_S", cls.worker_stall_s, minimum=1.0),
            system_prompt=env_str("SYSTEM_PROMPT", "") or "",
            openai_base_url=env_str("OPENAI_BASE_URL", cls.openai_base_url) or cls.openai_base_url,
            openai_api_key=env_str("OPENAI_API_KEY", "") or "",
            base_model_name=env_str("BASE_MODEL_NAME", cls.base_model_name) or cls.base_model_name,
            finetuned_model_name=env_str("FINETUNED_MODEL_NAME", cls.finetuned_model_name)
            or cls.finetuned_model_name,
            forum_db=_forum_db_from_env(),
            grounding_k=_grounding_k_from_env(),
            openai_sampling_extensions=sampling_extensions_from_env(),
        )


def _adapters_from_env(adapter_path: Path | None) -> tuple[AdapterSpec, ...]:
    """``ADAPTERS``, refused beside ``ADAPTER_PATH`` (which of the two would "finetuned" be?)."""
    raw = env_str("ADAPTERS")
    if raw is None:
        return ()
    if adapter_path is not None:
        raise UserError(
            "ADAPTERS and ADAPTER_PATH are both set: list every adapter in ADAPTERS "
            "(name=path,…) and unset ADAPTER_PATH"
        )
    try:
        return parse_adapters(raw)
    except ValueError as error:
        raise UserError(
            f"ADAPTERS={raw!r}: {error}; write name=path,name=path (e.g. v1=runs/v1/adapter)"
        ) from None


def _default_adapter_from_env(adapters: tuple[AdapterSpec, ...]) -> str | None:
    """``DEFAULT_ADAPTER``: one of ``ADAPTERS``'s names (unset: the first listed)."""
    name = env_str("DEFAULT_ADAPTER")
    if name is None:
        return None
    names = [spec.name for spec in adapters]
    if name not in names:
        listed = f"one of {', '.join(names)}" if names else "set ADAPTERS first"
        raise UserError(f"DEFAULT_ADAPTER={name} names no adapter in ADAPTERS: use {listed}")
    return name


MAX_GROUNDING_K = 20


def _forum_db_from_env() -> Path | None:
    """``FORUM_DB``; a missing or unindexed store is not an error here (grounding goes off)."""
    value = env_str("FORUM_DB")
    return Path(value).expanduser() if value else None


def _grounding_k_from_env() -> int | None:
    """``GROUNDING_K``, passages per answer; unset leaves it to the adapter (or 3)."""
    if not env_str("GROUNDING_K"):
        return None
    k = env_int("GROUNDING_K", 3, minimum=1)
    if k > MAX_GROUNDING_K:
        raise UserError(
            f"GROUNDING_K={k} is too large: at most {MAX_GROUNDING_K} passages fit a prompt"
        )
    return k
