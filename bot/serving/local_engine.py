"""The default :class:`~bot.serving.engine.Engine`: the quantized model on this machine, behind the worker.

This is the bridge between asyncio and the worker thread: requests go in
through :meth:`InferenceWorker.submit`, text and answers come back with
``loop.call_soon_threadsafe``, and a cancelled ``await`` takes its row out
of the batch. Loading the model happens in a thread too, so the bot can
connect to Discord meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from bot.serving.engine import (
    Answer,
    EngineStatus,
    EngineUnavailable,
    Message,
    OnText,
    Sampling,
    Variant,
    stream_for,
)
from bot.serving.settings import EngineSettings
from bot.serving.worker import GenerationRequest, InferenceWorker
from finetune.generation import GenerationSettings
from finetune.modeling import DEFAULT_ADAPTER_NAME

log = logging.getLogger(__name__)


class LocalEngine:
    """Serves base and finetuned answers from one model with the adapter attached unmerged."""

    def __init__(
        self,
        settings: EngineSettings,
        *,
        model_and_tokenizer: tuple[Any, Any] | None = None,
        device: str | None = None,
    ) -> None:
        """``model_and_tokenizer`` skips loading (tests and benchmarks share one loaded model)."""
        self.settings = settings
        self._preloaded = model_and_tokenizer
        self._device = device
        self._worker: InferenceWorker | None = None
        self._start_lock = asyncio.Lock()
        self._started_at = time.monotonic()
        self._device_name = device or "not loaded"

    @property
    def worker(self) -> InferenceWorker:
        if self._worker is None:
            raise EngineUnavailable("the model is still loading: try again in a moment")
        return self._worker

    async def start(self) -> None:
        async with self._start_lock:
            if self._worker is not None:
                return
            if self._preloaded is not None:
                model, tokenizer = self._preloaded
            else:
                model, tokenizer = await asyncio.to_thread(self._load)
            self._device_name = str(model.device)
            has_adapter = hasattr(model, "peft_config")
            self._worker = InferenceWorker(
                model,
                tokenizer,
                generation=GenerationSettings(
                    max_new_tokens=self.settings.max_new_tokens,
                    temperature=self.settings.temperature,
                    top_p=self.settings.top_p,
                    repetition_penalty=self.settings.repetition_penalty,
                ),
                adapter_name=DEFAULT_ADAPTER_NAME if has_adapter else None,
                max_batch=self.settings.max_batch,
                queue_size=self.settings.queue_size,
                batch_wait_s=self.settings.batch_wait_ms / 1000,
                max_batch_tokens=self.settings.max_batch_tokens,
                max_prefill_tokens=self.settings.max_prefill_tokens,
            )
            self._worker.start()
            self._started_at = time.monotonic()
            log.info(
                "model ready on %s (adapter: %s)", self._device_name, self.settings.adapter_path
            )

    def _load(self) -> tuple[Any, Any]:
        from finetune.modeling import load_for_inference

        return load_for_inference(
            self.settings.base_model,
            self.settings.adapter_path,
            load_in_4bit=self.settings.load_in_4bit,
            device=self._device,
        )

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Stop taking questions, let queued and running answers finish for a while, cancel the rest."""
        worker = self._worker
        if worker is None:
            return
        worker.stop_accepting()
        if not await asyncio.to_thread(worker.wait_idle, drain_timeout_s):
            log.warning("answers still running after %.0f s: cancelling them", drain_timeout_s)
        await asyncio.to_thread(worker.stop, cancel=True, timeout=drain_timeout_s)
        self._worker = None
        self._preloaded = None
        del worker
        await asyncio.to_thread(_release_memory)

    async def generate(
        self,
        messages: Sequence[Message],
        *,
        variant: Variant = "finetuned",
        max_new_tokens: int | None = None,
        on_text: OnText | None = None,
        sampling: Sampling | None = None,
        grounding: bool = True,  # grounding happens above the backend (GroundedEngine)
    ) -> Answer:
        (answer,) = await self._run([(variant, on_text)], messages, max_new_tokens, sampling)
        return answer

    async def compare(
        self,
        messages: Sequence[Message],
        *,
        max_new_tokens: int | None = None,
        on_text: Callable[[Variant, str], None] | None = None,
        sampling: Sampling | None = None,
        grounding: bool = True,
    ) -> tuple[Answer, Answer]:
        """Both variants as two rows that join the batch together and share every step."""
        base, finetuned = await self._run(
            [
                ("base", stream_for(on_text, "base")),
                ("finetuned", stream_for(on_text, "finetuned")),
            ],
            messages,
            max_new_tokens,
            sampling,
        )
        return base, finetuned

    async def _run(
        self,
        rows: Sequence[tuple[Variant, OnText | None]],
        messages: Sequence[Message],
        max_new_tokens: int | None,
        sampling: Sampling | None,
    ) -> list[Answer]:
        worker = self.worker
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.settings.request_timeout_s
        limit = min(max_new_tokens or self.settings.max_new_tokens, self.settings.max_new_tokens)
        futures: list[asyncio.Future[Answer]] = []
        requests: list[GenerationRequest] = []
        for variant, on_text in rows:
            future: asyncio.Future[Answer] = loop.create_future()
            futures.append(future)
            requests.append(
                GenerationRequest(
                    messages=list(messages),
                    variant=variant,
                    max_new_tokens=limit,
                    deadline=deadline,
                    on_done=_settle_on(loop, future),
                    on_text=_text_on(loop, on_text) if on_text is not None else None,
                    sampling=sampling,
                )
            )
        try:
            worker.submit(*requests)
            answers = list(await asyncio.gather(*futures))
        except BaseException:  # cancelled, or one row failed: free the others' rows
            for request in requests:
                worker.cancel(request)
            raise
        return answers

    def status(self) -> EngineStatus:
        worker = self._worker
        health, heartbeat_age_s = (
            worker.health(self.settings.worker_stall_s) if worker else ("stopped", None)
        )
        return EngineStatus(
            backend="local",
            model=self.settings.base_model,
            adapter=str(self.settings.adapter_path) if self.settings.adapter_path else None,
            device=self._device_name,
            ready=worker is not None,
            queue_depth=worker.queue_depth if worker else 0,
            queue_size=self.settings.queue_size,
            max_batch=self.settings.max_batch,
            batches_served=worker.batches_served if worker else 0,
            requests_served=worker.requests_served if worker else 0,
            tokens_generated=worker.tokens_generated if worker else 0,
            tokens_per_s=worker.tokens_per_s() if worker else 0.0,
            uptime_s=time.monotonic() - self._started_at,
            worker=health,
            heartbeat_age_s=heartbeat_age_s,
        )


def _settle_on(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Answer]
) -> Callable[[Answer | BaseException], None]:
    def settle(result: Answer | BaseException) -> None:
        try:
            loop.call_soon_threadsafe(_set_result, future, result)
        except RuntimeError:
            log.warning("an answer finished after its event loop closed; it was dropped")

    return settle


def _set_result(future: asyncio.Future[Answer], result: Answer | BaseException) -> None:
    if future.done():  # the caller gave up (cancelled) before the worker finished
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _text_on(loop: asyncio.AbstractEventLoop, on_text: OnText) -> OnText:
    def deliver(delta: str) -> None:
        try:
            loop.call_soon_threadsafe(on_text, delta)
        except RuntimeError:
            log.debug("streamed text arrived after its event loop closed; it was dropped")

    return deliver


def _release_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
