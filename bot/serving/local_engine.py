"""The default :class:`~bot.serving.engine.Engine`: the quantized model on this machine, behind the worker.

This is the bridge between asyncio and the worker thread: requests go in
through :meth:`InferenceWorker.submit`, text and answers come back with
``loop.call_soon_threadsafe``, and a cancelled ``await`` takes its row out
of the batch. Loading the model happens in a thread too, so the bot can
connect to Discord meanwhile.

Every adapter joins the model the same way, at start or at runtime: its files
are read in a thread (:func:`finetune.modeling.read_adapter`), then the worker
attaches it between two decoding steps, so an adapter answers the same
whenever it was loaded and answers in flight barely pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bot.serving.adapters import (
    FINETUNED,
    ServedAdapter,
    ServedModels,
    adapter_name_problem,
)
from bot.serving.engine import (
    VARIANTS,
    AdapterRejected,
    Answer,
    EngineStatus,
    EngineUnavailable,
    Message,
    OnText,
    Sampling,
    Variant,
    check_pair,
    stream_for,
)
from bot.serving.settings import EngineSettings
from bot.serving.worker import GenerationRequest, InferenceWorker
from finetune.errors import UserError
from finetune.generation import GenerationSettings
from finetune.modeling import AdapterWeights, read_adapter, template_difference

log = logging.getLogger(__name__)


class LocalEngine:
    """Serves the base and every adapter from one model, the adapters attached unmerged."""

    def __init__(
        self,
        settings: EngineSettings,
        *,
        model_and_tokenizer: tuple[Any, Any] | None = None,
        device: str | None = None,
    ) -> None:
        """``model_and_tokenizer`` skips loading (tests and benchmarks share one loaded model);
        its adapters are served under their peft names, with the paths ``settings`` gives them."""
        self.settings = settings
        # What front ends see of each served adapter (path, hash), by name; the event loop's.
        self._served: dict[str, ServedAdapter] = {}
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
                self._served = {
                    name: _served(name, _spec_path(self.settings, name), None)
                    for name in getattr(model, "peft_config", {})
                }
            else:
                model, tokenizer = await asyncio.to_thread(self._load)
            self._device_name = str(model.device)
            self._worker = InferenceWorker(
                model,
                tokenizer,
                generation=GenerationSettings(
                    max_new_tokens=self.settings.max_new_tokens,
                    temperature=self.settings.temperature,
                    top_p=self.settings.top_p,
                    repetition_penalty=self.settings.repetition_penalty,
                ),
                default_adapter=self.settings.default_adapter_name if self._served else None,
                base_model=self.settings.base_model,
                max_adapters=self.settings.max_adapters,
                max_batch=self.settings.max_batch,
                queue_size=self.settings.queue_size,
                batch_wait_s=self.settings.batch_wait_ms / 1000,
                max_batch_tokens=self.settings.max_batch_tokens,
                max_prefill_tokens=self.settings.max_prefill_tokens,
            )
            self._worker.start()
            self._started_at = time.monotonic()
            log.info(
                "model ready on %s (adapters: %s)",
                self._device_name,
                ", ".join(f"{a.name}={a.path}" for a in self._served.values()) or "none",
            )

    def _load(self) -> tuple[Any, Any]:
        """The base and its tokenizer, then every listed adapter, attached as at runtime."""
        from bot.serving.model_runner import ModelRunner
        from finetune.modeling import load_for_inference

        model, tokenizer = load_for_inference(
            self.settings.base_model, load_in_4bit=self.settings.load_in_4bit, device=self._device
        )
        runner = ModelRunner(
            model, tokenizer, generation=GenerationSettings(), base_model=self.settings.base_model
        )
        for spec in self.settings.adapter_specs:
            weights = self._read(spec.name, spec.path, tokenizer)
            try:
                runner.attach(spec.name, weights)  # the worker's first pass stacks them all
            except AdapterRejected as error:
                raise UserError(f"adapter {spec.name}: {error}") from None
            self._served[spec.name] = _served(spec.name, spec.path, weights.weights_hash)
        return runner.model, tokenizer

    @staticmethod
    def _read(name: str, path: str | os.PathLike[str], tokenizer: Any) -> AdapterWeights:
        """Read an adapter's files (off the model's thread); warn when its template differs."""
        weights = read_adapter(path)
        difference = template_difference(weights.chat_template, tokenizer.chat_template)
        if difference:
            log.warning(
                "adapter %s: %s; its answers are prompted with the base's template",
                name,
                difference,
            )
        return weights

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
        variant: Variant = FINETUNED,
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
        models: tuple[Variant, Variant] = VARIANTS,
        max_new_tokens: int | None = None,
        on_text: Callable[[Variant, str], None] | None = None,
        sampling: Sampling | None = None,
        grounding: bool = True,
    ) -> tuple[Answer, Answer]:
        """Both models as two rows that join the batch together and share every step."""
        check_pair(models)
        first, second = await self._run(
            [(name, stream_for(on_text, name)) for name in models],
            messages,
            max_new_tokens,
            sampling,
        )
        return first, second

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
            # Which adapter each row runs with, as it is now: it may be unloaded before the end.
            adapters = [self._served.get(r.adapter) if r.adapter else None for r in requests]
            answers = list(await asyncio.gather(*futures))
        except BaseException:  # cancelled, or one row failed: free the others' rows
            for request in requests:
                worker.cancel(request)
            raise
        return [
            dataclasses.replace(answer, adapter=adapter)
            for answer, adapter in zip(answers, adapters, strict=True)
        ]

    # ---- adapters -----------------------------------------------------------------------

    def models(self) -> ServedModels:
        worker = self._worker
        if worker is None:  # still loading: what will be served
            specs = self.settings.adapter_specs
            return ServedModels(
                tuple(_served(s.name, s.path, None) for s in specs),
                self.settings.default_adapter_name,
            )
        names = worker.adapters.names()
        return ServedModels(
            tuple(self._served.get(n) or _served(n, None, None) for n in names),
            worker.adapters.default,
        )

    async def load_adapter(self, name: str, path: str | os.PathLike[str]) -> ServedAdapter:
        worker = self.worker
        problem = adapter_name_problem(name)
        if problem:
            raise AdapterRejected(problem)
        worker.adapters.reserve(name)
        try:
            try:
                weights = await asyncio.to_thread(self._read, name, path, worker.runner.tokenizer)
            except UserError as error:
                raise AdapterRejected(str(error)) from None
            served = _served(name, weights.path, weights.weights_hash)
            self._served[name] = served  # before it answers, so no answer lacks it
            await self._on_worker(lambda done: worker.attach_adapter(name, weights, done))
        except BaseException:
            worker.adapters.release(name)
            if name not in worker.adapters.names():
                self._served.pop(name, None)
            raise
        log.info("adapter %s loaded from %s (weights %s)", name, weights.path, served.weights_hash)
        return served

    async def unload_adapter(self, name: str) -> None:
        worker = self.worker
        if name in VARIANTS:
            raise AdapterRejected(
                f"{name!r} is not an adapter's own name: unload the adapter it stands for "
                "after making another the default"
            )
        await self._on_worker(lambda done: worker.detach_adapter(name, done))
        self._served.pop(name, None)
        log.info("adapter %s unloaded", name)

    async def set_default(self, name: str) -> ServedModels:
        self.worker.adapters.set_default(name)
        log.info("adapter %s is now the default (%s)", name, FINETUNED)
        return self.models()

    @staticmethod
    async def _on_worker(submit: Callable[[Callable[[BaseException | None], None]], None]) -> None:
        """Hand the worker an adapter change and wait until it reports back."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def done(error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_set_result, future, error if error else None)

        submit(done)
        await future

    def status(self) -> EngineStatus:
        worker = self._worker
        health, heartbeat_age_s = (
            worker.health(self.settings.worker_stall_s) if worker else ("stopped", None)
        )
        return EngineStatus(
            backend="local",
            model=self.settings.base_model,
            adapter=self._default_path(),
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

    def _default_path(self) -> str | None:
        models = self.models()
        default = models.adapter(FINETUNED) if models.default else None
        return default.path if default else None


def _served(name: str, path: Path | None, weights_hash: str | None) -> ServedAdapter:
    return ServedAdapter(name=name, path=str(path) if path else "", weights_hash=weights_hash)


def _spec_path(settings: EngineSettings, name: str) -> Path | None:
    return next((s.path for s in settings.adapter_specs if s.name == name), None)


def _settle_on(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Answer]
) -> Callable[[Answer | BaseException], None]:
    def settle(result: Answer | BaseException) -> None:
        try:
            loop.call_soon_threadsafe(_set_result, future, result)
        except RuntimeError:
            log.warning("an answer finished after its event loop closed; it was dropped")

    return settle


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
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
