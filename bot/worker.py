"""The inference worker: one thread, one model, dynamic batches of base and finetuned rows.

A GPU serves many users best by decoding their answers together: one
``generate`` over a batch costs little more than over one row while decoding
is memory-bound. So the worker gathers whatever is waiting (up to
``max_batch``, after at most ``batch_wait_s``) and runs it as one left-padded
``generate`` with per-row ``adapter_names``; the LoRA adapter stays unmerged,
so a base row and a finetuned row share a batch and ``/compare`` costs one
pass, not two.

The thread owns the model: nothing else calls torch, so the event loop never
blocks on it. Callers talk to it through :class:`GenerationRequest` callbacks,
which run on the worker thread and must only hand results over (the
:class:`bot.local_engine.LocalEngine` passes them to its event loop).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bot import metrics
from bot.engine import (
    Answer,
    EngineBusy,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    Message,
    Variant,
)
from bot.messages import trim_oldest_first
from finetune.chat import chat_format, normalize_conversation
from finetune.generation import (
    GenerationSettings,
    adapter_names_for,
    chat_prompt,
    encode_chats,
    strip_stop_strings,
)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class GenerationRequest:
    """One row to generate, and where its text and its end go.

    ``on_text`` receives text deltas and ``on_done`` the :class:`Answer` or the
    exception, both on the worker thread. ``cancelled`` may be set from any
    thread; the row then leaves its batch at the next decoding step.
    """

    messages: Sequence[Message]
    variant: Variant
    max_new_tokens: int
    deadline: float  # time.monotonic() by which the answer must be complete
    on_done: Callable[[Answer | BaseException], None]
    on_text: Callable[[str], None] | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # Filled in by the worker.
    started_at: float | None = None
    first_text_at: float | None = None
    emitted_chars: int = 0  # survives an out-of-memory retry, so text is not streamed twice
    done: bool = False


class BatchStreamer:
    """Per-row incremental decoding for a batched ``generate``.

    transformers' ``TextIteratorStreamer`` takes one row only. This one gets
    the whole batch's new tokens each step, keeps every row's tokens, emits
    each row's new text (never half a UTF-8 character, never the start of a
    stop string) and decides when each row is done: its own token budget, a
    stop string, cancellation or its deadline. :class:`RowsDone` tells
    ``generate`` so the row stops costing compute.
    """

    def __init__(
        self,
        requests: Sequence[GenerationRequest],
        tokenizer: Any,
        stop_strings: Sequence[str],
        finish: Callable[[int, str], None],
    ) -> None:
        self.requests = requests
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.finish = finish  # (row, finish_reason) → the worker settles that request
        self.stop_token_ids = set(chat_format(tokenizer).stop_token_ids)
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.texts: list[str] = ["" for _ in requests]
        self.done = [False] * len(requests)
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt ids
            self._prompt_seen = True
            return
        now = time.monotonic()
        for row, token in enumerate(value.tolist()):
            if self.done[row]:
                continue
            request = self.requests[row]
            if request.cancelled:
                self._end(row, "cancelled")
            elif now > request.deadline:
                self._end(row, "timeout")
            elif token in self.stop_token_ids:
                self._end(row, "stop")
            else:
                self.tokens[row].append(token)
                stopped = self._update_text(row)
                if stopped:
                    self._end(row, "stop")
                elif len(self.tokens[row]) >= request.max_new_tokens:
                    self._end(row, "length")

    def end(self) -> None:
        """``generate`` returned: every row still open ran out of the batch's token budget."""
        for row in range(len(self.requests)):
            if not self.done[row]:
                self._end(row, "length")

    def _update_text(self, row: int) -> bool:
        """Decode the row, stream its settled new text; True once a stop string appeared."""
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        stopped = False
        for stop in self.stop_strings:
            index = text.find(stop)
            if index != -1:
                text, stopped = text[:index], True
        self.texts[row] = text
        settled = len(text) if stopped else self._settled_length(text)
        self._emit(self.requests[row], text, settled)
        return stopped

    @staticmethod
    def _emit(request: GenerationRequest, text: str, end: int) -> None:
        """Stream ``text[:end]`` beyond what the caller has; the answer starts at its first
        visible character."""
        if request.on_text is None:
            return
        start = request.emitted_chars
        if start == 0:
            start = end - len(text[:end].lstrip())
        if start >= end:
            return
        request.emitted_chars = end
        if request.first_text_at is None:
            request.first_text_at = time.monotonic()
        request.on_text(text[start:end])

    def _settled_length(self, text: str) -> int:
        """How much of ``text`` cannot change: hold back a partial character or stop string."""
        end = len(text) - 1 if text.endswith("\ufffd") else len(text)
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, end), 0, -1):
                if text[end - size : end] == stop[:size]:
                    end -= size
                    break
        return end

    def _end(self, row: int, reason: str) -> None:
        """Flush what was held back (a stop-string prefix that never completed), then settle."""
        self.done[row] = True
        text = self.texts[row] = self.texts[row].rstrip("\ufffd")  # half a character is noise
        if reason != "cancelled":
            self._emit(self.requests[row], text, len(text))
        self.finish(row, reason)


class RowsDone:
    """A stopping criterion that ends the rows the :class:`BatchStreamer` has finished.

    transformers calls criteria before handing the step's tokens to the
    streamer, so a row leaves one step after the streamer ends it: one extra
    token of compute, and no second decode of every row each step.
    """

    def __init__(self, streamer: BatchStreamer) -> None:
        self.streamer = streamer

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.tensor(self.streamer.done, dtype=torch.bool, device=input_ids.device)


class InferenceWorker:
    """Owns the model on one thread and serves :class:`GenerationRequest` batches from a bounded queue."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        generation: GenerationSettings,
        adapter_name: str | None,
        max_batch: int = 8,
        queue_size: int = 64,
        batch_wait_s: float = 0.005,
        max_context_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.generation = generation
        self.stop_strings = generation.stops(tokenizer)
        self.adapter_name = adapter_name
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.batch_wait_s = batch_wait_s
        window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_context_tokens = max_context_tokens or window or 4096
        self.started_at = time.monotonic()
        self.batches_served = 0
        self.requests_served = 0
        self.tokens_generated = 0
        self.generate_calls = 0
        self._throughput = metrics.RecentRate()
        self._pending: deque[tuple[GenerationRequest, ...]] = deque()
        self._pending_rows = 0
        self._in_flight: list[GenerationRequest] = []
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- the caller's side (any thread) -------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inference-worker", daemon=True)
            self._thread.start()

    def submit(self, *requests: GenerationRequest) -> int:
        """Queue ``requests`` as one group (a ``/compare`` pair stays in one batch).

        Returns how many rows wait ahead of them. A full queue raises
        :class:`EngineBusy` at once rather than growing a backlog nobody waits for.
        """
        if self.adapter_name is None and any(r.variant == "finetuned" for r in requests):
            raise EngineError(
                "no finetuned adapter is loaded (ADAPTER_PATH is unset): ask the base model"
            )
        with self._cond:
            if not self._accepting:
                raise EngineUnavailable("the bot is shutting down and takes no new questions")
            if self._pending_rows + len(requests) > self.queue_size:
                metrics.ERRORS.labels(kind="queue_full").inc()
                raise EngineBusy(self._retry_after_s())
            ahead = self._pending_rows + len(self._in_flight)
            self._pending.append(tuple(requests))
            self._pending_rows += len(requests)
            metrics.QUEUE_DEPTH.set(self._pending_rows)
            self._cond.notify()
        return ahead

    def cancel(self, request: GenerationRequest) -> None:
        """Take ``request`` out: from the queue now, or from its batch at the next step."""
        request.cancelled = True
        with self._cond:
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return self._pending_rows

    @property
    def busy(self) -> bool:
        return bool(self._pending_rows or self._in_flight)

    def tokens_per_s(self) -> float:
        with self._cond:
            return self._throughput.per_second()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the queue is empty and no batch runs; False if ``timeout`` came first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self.busy, timeout)

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def stop(self, *, cancel: bool, timeout: float | None = None) -> None:
        """End the thread after the queue drains, or at once cancelling everything (``cancel``)."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            if cancel:
                for group in self._pending:
                    for request in group:
                        request.cancelled = True
                for request in self._in_flight:
                    request.cancelled = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _retry_after_s(self) -> float:
        """A rough wait for a free slot: the queue ahead, at the recent pace of one batch."""
        rate = self._throughput.per_second()
        if rate <= 0:
            return 10.0
        tokens_ahead = self._pending_rows * self.generation.max_new_tokens / max(self.max_batch, 1)
        return max(1.0, min(120.0, tokens_ahead / rate))

    # ---- the worker thread --------------------------------------------------------------

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._serve(batch)
            except Exception as exc:  # a bug or a broken model must not stop the worker
                log.exception("batch of %d failed", len(batch))
                metrics.ERRORS.labels(kind="generate").inc()
                for request in batch:
                    self._fail(request, EngineError(f"generation failed: {type(exc).__name__}"))
            finally:
                with self._cond:
                    self._in_flight = []
                    self._cond.notify_all()  # wake wait_idle()

    def _next_batch(self) -> list[GenerationRequest] | None:
        """Wait for work, give late arrivals ``batch_wait_s`` to join, take up to ``max_batch`` rows."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if not self._pending:
                return None
            if self._pending_rows < self.max_batch and not self._stopping:
                wait_until = time.monotonic() + self.batch_wait_s
                while self._pending_rows < self.max_batch and not self._stopping:
                    remaining = wait_until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            batch: list[GenerationRequest] = []
            now = time.monotonic()
            while self._pending:
                group = self._pending[0]
                if batch and len(batch) + len(group) > self.max_batch:
                    break
                self._pending.popleft()
                self._pending_rows -= len(group)
                for request in group:
                    if request.cancelled:
                        self._settle(request, "cancelled", now)
                    elif now > request.deadline:
                        self._fail(
                            request, EngineTimeout("no answer in time: the queue was too long")
                        )
                    else:
                        request.started_at = now
                        metrics.QUEUE_SECONDS.observe(now - request.enqueued_at)
                        batch.append(request)
            metrics.QUEUE_DEPTH.set(self._pending_rows)
            self._in_flight = batch
        return batch

    def _serve(self, batch: list[GenerationRequest]) -> None:
        """Generate ``batch``; on out-of-memory, halve it and retry each half."""
        import torch

        live = [r for r in batch if not r.done]
        if not live:
            return
        try:
            self._generate(live)
        except torch.cuda.OutOfMemoryError:
            metrics.ERRORS.labels(kind="out_of_memory").inc()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            retry = [r for r in live if not r.done]
            if len(retry) == 1:
                log.warning("out of memory on a single row; giving up on it")
                self._fail(
                    retry[0],
                    EngineError("the model ran out of memory on this question: try a shorter one"),
                )
                return
            log.warning("out of memory on a batch of %d; splitting it", len(retry))
            half = len(retry) // 2
            self._serve(retry[:half])
            self._serve(retry[half:])

    def _generate(self, batch: list[GenerationRequest]) -> None:
        import torch

        conversations = [self._fit_context(r) for r in batch]
        inputs = encode_chats(self.tokenizer, conversations, device=self.model.device)
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        kwargs = self.generation.generate_kwargs(self.tokenizer)
        kwargs["max_new_tokens"] = max(r.max_new_tokens for r in batch)
        adapters = self._adapter_context([r.variant for r in batch], kwargs)

        def finish(row: int, reason: str) -> None:
            request = batch[row]
            if reason == "timeout":
                self._fail(request, EngineTimeout("the answer took too long and was stopped"))
            else:
                self._settle(
                    request,
                    reason,
                    time.monotonic(),
                    text=streamer.texts[row],
                    prompt_tokens=prompt_tokens[row],
                    completion_tokens=len(streamer.tokens[row]),
                )

        streamer = BatchStreamer(batch, self.tokenizer, self.stop_strings, finish)
        metrics.BATCH_SIZE.observe(len(batch))
        self.generate_calls += 1
        with torch.inference_mode(), adapters:
            self.model.generate(
                **inputs, **kwargs, streamer=streamer, stopping_criteria=[RowsDone(streamer)]
            )
        self.batches_served += 1
        if torch.cuda.is_available():
            metrics.GPU_MEMORY_BYTES.set(torch.cuda.memory_allocated())

    def _adapter_context(
        self, variants: list[Variant], kwargs: dict[str, Any]
    ) -> contextlib.AbstractContextManager[Any]:
        """Route each row to its adapter, paying for per-row routing only in mixed batches.

        peft's ``adapter_names`` path splits every LoRA layer's input by adapter,
        which costs several times a plain forward at batch 16; a batch of one
        variant runs with the adapter simply on, or off. Turning it off is
        global to the model, which is safe only because this thread alone runs it.
        """
        kinds = set(variants)
        if self.adapter_name is None or kinds == {"finetuned"}:
            return contextlib.nullcontext()
        if kinds == {"base"}:
            return self.model.disable_adapter()
        kwargs["adapter_names"] = adapter_names_for(variants, self.adapter_name)
        return contextlib.nullcontext()

    def _fit_context(self, request: GenerationRequest) -> list[Message]:
        """The request's chat, oldest turns dropped until prompt + answer fit the model's window."""
        budget = self.max_context_tokens - request.max_new_tokens

        def fits(messages: list[Message]) -> bool:
            prompt = chat_prompt(self.tokenizer, messages)
            return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= budget

        # Normalized first, so the oldest turns go in user/assistant pairs whatever was sent.
        return trim_oldest_first(normalize_conversation(request.messages), fits)

    def _settle(
        self,
        request: GenerationRequest,
        reason: str,
        now: float,
        *,
        text: str = "",
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        if request.done:
            return
        request.done = True
        started = request.started_at or now
        answer = Answer(
            text=strip_stop_strings(text, self.stop_strings),
            variant=request.variant,
            finish_reason=reason,  # type: ignore[arg-type]
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            queue_s=started - request.enqueued_at,
            first_token_s=(
                request.first_text_at - request.enqueued_at if request.first_text_at else None
            ),
            total_s=now - request.enqueued_at,
        )
        if answer.first_token_s is not None:
            metrics.FIRST_TOKEN_SECONDS.observe(answer.first_token_s)
        metrics.ANSWERS.labels(variant=request.variant, outcome=reason).inc()
        if completion_tokens:
            metrics.GENERATED_TOKENS.labels(variant=request.variant).inc(completion_tokens)
            with self._cond:
                self._throughput.add(completion_tokens)
                metrics.TOKENS_PER_SECOND.set(self._throughput.per_second())
        self.requests_served += 1
        self.tokens_generated += completion_tokens
        self._deliver(request, answer)

    def _fail(self, request: GenerationRequest, error: EngineError) -> None:
        if request.done:
            return
        request.done = True
        kind = "timeout" if isinstance(error, EngineTimeout) else "error"
        metrics.ANSWERS.labels(variant=request.variant, outcome=kind).inc()
        self._deliver(request, error)

    @staticmethod
    def _deliver(request: GenerationRequest, result: Answer | BaseException) -> None:
        with contextlib.suppress(Exception):  # a caller's broken callback must not kill the worker
            request.on_done(result)
