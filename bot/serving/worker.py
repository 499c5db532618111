"""The inference worker: one thread, one model, continuous batching of rows with their own adapters.

A GPU serves many users best by decoding their answers together: one step
over a batch costs little more than over one row while decoding is
memory-bound. ``generate`` batches statically — nobody joins until the
longest answer ends — so the worker runs its own decoding loop and
schedules per step (iteration-level scheduling): questions that arrive are
prefilled and join the running batch at the next step, and a row that ends
leaves it at once, freeing its cache (:mod:`bot.serving.batch`). The LoRA
adapter stays unmerged, so a base row and a finetuned row share every step
and ``/compare`` costs one pass, not two.

This module is the scheduler, as text-generation-inference's router is: the
queue, admission by a budget of cache slots (``max_batch_tokens``: a row
reserves its prompt plus its whole answer, counted as the padded rectangle
the cache holds), cancellation and deadlines, out-of-memory recovery and the
heartbeat. What happens inside a step — encoding, forward passes, adapter
routing, token choice and where an answer ends — is the
:class:`~bot.serving.model_runner.ModelRunner`'s.

Adapters join and leave while answers stream. Whatever changes the model
(attaching an adapter read off this thread, swapping in the batched-LoRA
stacks built off it, deleting one) is a command the loop runs between two
decoding steps; an adapter being unloaded is refused
to new requests at once and deleted once no row runs on it any more.

The thread owns the model and the tokenizer: nothing else calls torch or
tokenizes (a fast tokenizer used from two threads at once can fail), so the
event loop never blocks on them. Callers talk to it through
:class:`GenerationRequest` callbacks, which run on the worker thread and
must only hand results over (the :class:`bot.serving.local_engine.LocalEngine`
passes them to its event loop).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from bot.serving import metrics
from bot.serving.batch import DecodeBatch
from bot.serving.engine import (
    Answer,
    EngineBusy,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    FinishReason,
    Message,
    RequestTooLong,
    Sampling,
    Variant,
)
from bot.serving.model_runner import ModelRunner, RowState
from bot.serving.served_adapters import OnAdapterDone, ServedAdapters
from finetune.generation import GenerationSettings
from finetune.modeling import BASE_ADAPTER_NAME, AdapterWeights

if TYPE_CHECKING:
    import torch

    from bot.serving.batched_lora import Stacking

log = logging.getLogger(__name__)

OUT_OF_MEMORY = "the model ran out of memory on this question: try a shorter one"
FAILING_AFTER = 3  # scheduling steps in a row that raised before the worker reports "failing"


@dataclass(eq=False)
class GenerationRequest:
    """One row to generate, and where its text and its end go.

    ``on_text`` receives text deltas and ``on_done`` the :class:`Answer` or the
    exception, both on the worker thread. ``cancelled`` may be set from any
    thread; the row then leaves its batch before the next decoding step.
    ``sampling`` fields left ``None`` take the worker's generation settings.
    ``variant`` names the model to answer as (``base``, ``finetuned`` or an
    adapter's name); the worker resolves it to an adapter when it is submitted.
    """

    messages: Sequence[Message]
    variant: Variant
    max_new_tokens: int
    deadline: float  # time.monotonic() by which the answer must be complete
    on_done: Callable[[Answer | BaseException], None]
    on_text: Callable[[str], None] | None = None
    sampling: Sampling | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # Filled in by the worker.
    started_at: float | None = None
    first_text_at: float | None = None
    done: bool = False
    adapter: str | None = None  # the adapter the worker resolved it to; None for the base


# Why a row leaves the batch before its answer ended by itself.
Ended = Literal["cancelled", "timeout"]


def _ended(request: GenerationRequest, now: float) -> Ended | None:
    """Whether the asker gave up on ``request`` or its deadline passed: the one check, made
    in the queue, before each step and after it."""
    if request.cancelled:
        return "cancelled"
    if now > request.deadline:
        return "timeout"
    return None


@dataclass(eq=False, kw_only=True)
class _Row(RowState):
    """A request as the scheduler holds it, from the queue through the batch to its answer.

    It outlives a place in the batch: a row evicted after running out of
    memory goes back to the queue with what it generated and is prefilled
    again from prompt + answer so far, so nothing is streamed twice.
    """

    request: GenerationRequest

    @property
    def reserve(self) -> int:
        """Cache slots the row may come to need: its prompt and its whole answer."""
        assert self.prompt_ids is not None
        return len(self.prompt_ids) + self.max_new_tokens


class InferenceWorker:
    """Owns the model on one thread and serves :class:`GenerationRequest` rows from a bounded queue."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        generation: GenerationSettings,
        default_adapter: str | None = None,
        base_model: str = "",
        max_adapters: int = 8,
        max_batch: int = 8,
        queue_size: int = 64,
        batch_wait_s: float = 0.005,
        max_batch_tokens: int = 16384,
        max_prefill_tokens: int = 2048,
        max_context_tokens: int | None = None,
    ) -> None:
        self.runner = ModelRunner(
            model,
            tokenizer,
            generation=generation,
            base_model=base_model,
            max_context_tokens=max_context_tokens,
        )
        self._cond = threading.Condition()
        self.adapters = ServedAdapters(
            self.runner.adapter_names,
            default_adapter,
            max_adapters=max_adapters,
            lock=self._cond,
        )
        # Model changes to run between two steps, each with whom to tell how it went.
        self._commands: deque[tuple[Callable[[], None], OnAdapterDone]] = deque()
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.batch_wait_s = batch_wait_s
        self.max_batch_tokens = max_batch_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.started_at = time.monotonic()
        self.batches_served = 0  # prefills: groups of questions that joined the running batch
        self.requests_served = 0
        self.tokens_generated = 0
        self._throughput = metrics.RecentRate()
        self._token_cap = max_batch_tokens  # lowered after running out of memory
        self._pending: deque[list[_Row]] = deque()
        self._pending_rows = 0
        self._dropped: list[_Row] = []  # cancelled while queued: out of the count, to settle
        self._running: list[_Row] = []  # the batch's rows plus those being prefilled
        self._batch: DecodeBatch | None = None  # the worker thread's alone
        self._steps = 0
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._beat = time.monotonic()  # the loop's heartbeat: when it last went round
        self._failed_steps = 0  # scheduling steps in a row that raised

    # ---- the caller's side (any thread) -------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inference-worker", daemon=True)
            self._thread.start()

    def submit(self, *requests: GenerationRequest) -> int:
        """Queue ``requests`` as one group (a ``/compare`` pair joins the batch together).

        Returns how many rows are ahead of them. A full queue raises
        :class:`EngineBusy` at once rather than growing a backlog nobody waits for.
        """
        with self._cond:
            for request in requests:
                request.adapter = self.adapters.resolve(request.variant)
        group = [
            _Row(
                request=r,
                adapter=r.adapter or BASE_ADAPTER_NAME,
                max_new_tokens=r.max_new_tokens,
                text=self.runner.row_text(r.sampling),
            )
            for r in requests
        ]
        with self._cond:
            if not self._accepting:
                raise EngineUnavailable("the bot is shutting down and takes no new questions")
            if self._pending_rows + len(group) > self.queue_size:
                metrics.ERRORS.labels(kind="queue_full").inc()
                raise EngineBusy(self._retry_after_s())
            ahead = self._pending_rows + len(self._running)
            self._pending.append(group)
            self._pending_rows += len(group)
            metrics.QUEUE_DEPTH.set(self._pending_rows)
            self._cond.notify()
        return ahead

    def cancel(self, request: GenerationRequest) -> None:
        """Take ``request`` out: from the queue at once, or from the batch before the next step.

        A queued row leaves the queue (and its count) here, so a client that
        gave up frees its place for the next one now, not when the worker
        reaches it; the worker thread settles it as cancelled.
        """
        request.cancelled = True
        with self._cond:
            for group in self._pending:
                row = next((r for r in group if r.request is request), None)
                if row is not None:
                    group.remove(row)
                    if not group:
                        self._pending.remove(group)
                    self._pending_rows -= 1
                    self._dropped.append(row)
                    metrics.QUEUE_DEPTH.set(self._pending_rows)
                    break
            self._cond.notify()

    # ---- adapters (any thread) ----------------------------------------------------------

    def attach_adapter(self, name: str, weights: AdapterWeights, on_done: OnAdapterDone) -> None:
        """Attach a reserved adapter between two steps; ``on_done`` hears when it answers.

        Three steps, so answers in flight pause only for what must touch the
        model: peft's new layers are made between two steps, the
        batched-LoRA stacks that serve the adapter are built on a thread of
        their own while decoding goes on, and swapping them in (which makes
        the adapter served) is again a step's pause.
        """

        def attach() -> None:
            try:
                stacking = self.runner.attach(name, weights)
            except BaseException:
                self.adapters.release(name)
                raise
            threading.Thread(
                target=self._stack_then_serve,
                args=(name, stacking, on_done),
                name=f"stack adapter {name}",
                daemon=True,
            ).start()

        def refused(error: BaseException | None) -> None:
            if error is not None:  # on success, the swap reports
                on_done(error)

        self._command(attach, refused)

    def _stack_then_serve(
        self, name: str, stacking: Stacking | None, on_done: OnAdapterDone
    ) -> None:
        """Off the worker's thread: build ``name``'s stacks, then swap them in and serve it."""
        if stacking is not None:
            try:
                stacking.build()
            except Exception:  # install builds them on the worker's thread instead
                log.exception("stacking adapter %s off the worker's thread failed", name)

        def serve() -> None:
            try:
                self.runner.install(stacking)
            except BaseException:
                self.adapters.release(name)
                raise
            self.adapters.serve(name)

        try:
            self._command(serve, on_done)
        except EngineUnavailable as error:
            on_done(error)

    def detach_adapter(self, name: str, on_done: OnAdapterDone) -> None:
        """Refuse ``name`` to new requests now; delete it once the rows on it have ended."""
        with self._cond:
            self.adapters.mark_unloading(name, on_done)
            self._cond.notify()

    def _command(self, command: Callable[[], None], on_done: OnAdapterDone) -> None:
        with self._cond:
            if self._stopping:
                raise EngineUnavailable("the bot is shutting down")
            self._commands.append((command, on_done))
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return self._pending_rows

    @property
    def busy(self) -> bool:
        return bool(self._pending_rows or self._running)

    def health(self, stall_s: float) -> tuple[str, float]:
        """The loop's state from its heartbeat, and seconds since it last went round.

        "stopped": the thread is not running; "failing": its last steps all
        raised; "stalled": it has work but took no step for ``stall_s``.
        """
        age = time.monotonic() - self._beat
        if self._thread is None or not self._thread.is_alive():
            return "stopped", age
        if self._failed_steps >= FAILING_AFTER:
            return "failing", age
        if self.busy and age > stall_s:
            return "stalled", age
        return "ok", age

    def tokens_per_s(self) -> float:
        with self._cond:
            return self._throughput.per_second()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the queue is empty and no row runs; False if ``timeout`` came first."""
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
                    for row in group:
                        row.request.cancelled = True
                for row in self._running:
                    row.request.cancelled = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _retry_after_s(self) -> float:
        """A rough wait for a free slot: the queue ahead, at the recent pace."""
        rate = self._throughput.per_second()
        if rate <= 0:
            return 10.0
        tokens_ahead = self._pending_rows * self.runner.generation.max_new_tokens
        return max(1.0, min(120.0, tokens_ahead / rate))

    # ---- the worker thread: the scheduling loop -----------------------------------------

    def _run(self) -> None:
        import torch

        with torch.inference_mode(), contextlib.ExitStack() as cleanup:
            cleanup.callback(self.runner.restore)  # leave the model as it was given
            cleanup.callback(self._refuse_adapter_changes)
            while self._wait_for_work():
                self._beat = time.monotonic()
                try:
                    self._iterate()
                    self._failed_steps = 0
                except torch.cuda.OutOfMemoryError:
                    self._recover_from_out_of_memory()
                except Exception as exc:  # a bug or a broken model must not stop the worker
                    self._failed_steps += 1
                    log.exception("decoding %d rows failed", len(self._running))
                    metrics.ERRORS.labels(kind="generate").inc()
                    error = EngineError(f"generation failed: {type(exc).__name__}")
                    for row in self._running:
                        self._fail(row, error)
                    self._batch = None
                finally:
                    self._publish_running()
                    self._beat = time.monotonic()

    def _wait_for_work(self) -> bool:
        """Sleep while there is nothing to do; an idle worker gives late arrivals ``batch_wait_s``."""
        with self._cond:
            while (
                not self._pending
                and not self._dropped
                and self._batch is None
                and not self._commands
                and not self.adapters.unloading
                and not self._stopping
            ):
                self._cond.wait()
            if (
                not self._pending
                and not self._dropped
                and self._batch is None
                and not self._commands
                and not self.adapters.unloading
            ):
                return False  # stopping, and everything is answered
            if self._batch is None and not self._stopping:
                wait_until = time.monotonic() + self.batch_wait_s
                while self._pending_rows < self.max_batch and not self._stopping:
                    remaining = wait_until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
        return True

    def _iterate(self) -> None:
        """One scheduling step: drop rows that ended, admit what fits in the room they leave,
        prefill it into the batch, decode one token for every row."""
        self._settle_dropped()
        self._drop_ended()
        self._change_adapters()
        admitted = self._admit()
        if admitted:
            self._join(admitted)
        if self._batch is not None:
            self._decode_step()

    def _change_adapters(self) -> None:
        """Run the adapter commands, and delete each adapter being unloaded that no row uses."""
        while True:
            with self._cond:
                if not self._commands:
                    break
                command, on_done = self._commands.popleft()
            try:
                command()
            except Exception as error:
                on_done(error)
            else:
                on_done(None)
        with self._cond:
            if not self.adapters.unloading:
                return
            in_use = {r.adapter for group in self._pending for r in group}
            in_use.update(r.adapter for r in self._running)
            if self._batch is not None:
                in_use.update(r.adapter for r in self._batch.rows)
            unused = self.adapters.unused_unloading(in_use)
        for name in unused:
            failure: BaseException | None = None
            try:
                self.runner.detach(name)
            except Exception as exc:
                log.exception("unloading adapter %s failed", name)
                failure = exc
            self.adapters.unloaded(name, deleted=failure is None)(failure)

    def _refuse_adapter_changes(self) -> None:
        """The loop has ended: adapter changes still waiting will not happen."""
        with self._cond:
            commands, self._commands = list(self._commands), deque()
            unloading = self.adapters.abandon_unloading()
        stopped = EngineUnavailable("the bot is shutting down")
        for on_done in [*unloading, *(on_done for _, on_done in commands)]:
            on_done(stopped)

    def _admit(self) -> list[_Row]:
        """Take queued groups, oldest first, while rows, cache slots and the prefill allowance last.

        An idle worker always takes the oldest group, whatever the budget
        after an out-of-memory says, so nothing waits forever.
        """
        running = self._batch.rows if self._batch is not None else []
        reserve = max((r.reserve for r in running), default=0)
        admitted: list[_Row] = []
        while True:
            with self._cond:
                if not self._pending:
                    break
                group = self._pending[0]
            now = time.monotonic()
            rows = list(group)  # cancel() may take rows out of the group meanwhile
            for row in rows:
                if not row.request.done:
                    self._prepare_alone(row, now)
            live = [r for r in rows if not r.request.done]
            if live and (running or admitted):
                count = len(running) + len(admitted) + len(live)
                group_reserve = max(reserve, *(r.reserve for r in live))
                longest = max(len(r.input_ids) for r in admitted + live)
                if (
                    count > self.max_batch
                    or count * group_reserve > self._token_cap
                    or (
                        admitted and (len(admitted) + len(live)) * longest > self.max_prefill_tokens
                    )
                ):
                    break
            with self._cond:
                if self._pending and self._pending[0] is group:  # else cancel() took it all
                    self._pending.popleft()
                    self._pending_rows -= len(group)
                metrics.QUEUE_DEPTH.set(self._pending_rows)
                self._running.extend(live)
            for row in live:
                if row.request.started_at is None:
                    row.request.started_at = now
                    metrics.QUEUE_SECONDS.observe(now - row.request.enqueued_at)
                reserve = max(reserve, row.reserve)
            admitted.extend(live)
        return admitted

    def _prepare_alone(self, row: _Row, now: float) -> None:
        """Prepare one row so that whatever goes wrong ends that row alone.

        It runs before the row leaves the queue: an exception escaping here
        would fail the running batch and leave the row at the head of the
        queue to fail again, for every user, on every step.
        """
        try:
            self._prepare(row, now)
        except EngineError as error:  # the asker's to fix; already says how
            log.info("refused a question: %s", error)
            self._fail(row, error)
        except Exception as exc:
            log.exception("preparing a question failed")
            metrics.ERRORS.labels(kind="prepare").inc()
            self._fail(
                row, EngineError(f"this question could not be prepared: {type(exc).__name__}")
            )

    def _prepare(self, row: _Row, now: float) -> None:
        """Settle a queued row that is cancelled, late or too long; tokenise it the first time."""
        request = row.request
        ended = _ended(request, now)
        if ended is not None:
            self._end(row, ended, now)
            return
        if row.prompt_ids is not None:  # back in the queue after running out of memory
            return
        limit = min(self.runner.max_context_tokens, self.max_batch_tokens)
        prompt_ids = self.runner.fit_context(request.messages, limit - request.max_new_tokens)
        if len(prompt_ids) + request.max_new_tokens > limit:
            self._fail(
                row,
                RequestTooLong(
                    f"the question is too long: {len(prompt_ids)} prompt tokens plus up to "
                    f"{request.max_new_tokens} for the answer is more than the {limit} this "
                    "model server takes; shorten it or ask for a shorter answer"
                ),
            )
            return
        self.runner.prepare(row, prompt_ids, request.sampling)

    def _join(self, admitted: list[_Row]) -> None:
        """Prefill the admitted rows, give each its first token, and add them to the batch."""
        new, logits = self.runner.prefill(admitted)
        self.batches_served += 1
        self._advance(new, logits)
        if len(new):
            self._batch = new if self._batch is None else DecodeBatch.concatenate(self._batch, new)
        self._gauge_memory()

    def _decode_step(self) -> None:
        batch = self._batch
        assert batch is not None
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.RUNNING_ROWS.set(len(batch))
        metrics.BATCH_TOKENS.set(batch.tokens_held)
        logits = self.runner.step(batch)
        self._advance(batch, logits)
        if not len(batch):
            self._batch = None
            metrics.RUNNING_ROWS.set(0)
            metrics.BATCH_TOKENS.set(0)
        self._steps += 1
        if self._steps % 64 == 0:
            self._gauge_memory()

    def _advance(self, batch: DecodeBatch, logits: torch.Tensor) -> None:
        """Give each row its next token, stream it, and let the rows that ended leave."""
        rows: list[_Row] = batch.rows
        tokens, broken = self.runner.choose(batch, logits)
        now = time.monotonic()
        keep = []
        for index, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if index in broken:
                self._fail(row, broken[index])
                continue
            reason = _ended(row.request, now) or self.runner.add_token(row, token)
            if reason is None:
                self._stream(row, final=False)
                keep.append(index)
            else:
                self._end(row, reason, now)
        self._count_tokens(len(rows))
        if len(keep) < len(rows):
            if keep:
                batch.keep(keep)
            else:
                batch.rows = []

    def _drop_ended(self) -> None:
        """Rows cancelled or past their deadline leave before the step, not after it."""
        batch = self._batch
        if batch is None:
            return
        now = time.monotonic()
        keep = []
        for index, row in enumerate(batch.rows):
            reason = _ended(row.request, now)
            if reason is None:
                keep.append(index)
            else:
                self._end(row, reason, now)
        if not keep:
            self._batch = None
        elif len(keep) < len(batch):
            batch.keep(keep)

    # ---- running out of memory ----------------------------------------------------------

    def _recover_from_out_of_memory(self) -> None:
        """Put every running row back at the head of the queue and halve the token budget.

        The batch's cache may be half-updated, so it is dropped; its rows keep
        what they generated and are prefilled again from there (nothing is
        streamed twice). A row that runs out of memory alone gets a clear error.
        """
        import torch

        metrics.ERRORS.labels(kind="out_of_memory").inc()
        rows = [r for r in self._running if not r.request.done]
        self._batch = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(rows) == 1:
            log.warning("out of memory on a single row; giving up on it")
            self._fail(rows[0], EngineError(OUT_OF_MEMORY))
            return
        attempted = len(rows) * max(r.reserve for r in rows)
        self._token_cap = max(max(r.reserve for r in rows), attempted // 2)
        log.warning(
            "out of memory with %d rows (%d cache slots reserved): retrying them with a budget of "
            "%d; set MAX_BATCH_TOKENS at or below that to avoid this",
            len(rows),
            attempted,
            self._token_cap,
        )
        with self._cond:
            self._running = []
            self._pending.extendleft([row] for row in reversed(rows))
            self._pending_rows += len(rows)
            metrics.QUEUE_DEPTH.set(self._pending_rows)

    # ---- answers ------------------------------------------------------------------------

    def _stream(self, row: _Row, *, final: bool) -> None:
        request = row.request
        if request.on_text is None:
            return
        delta = row.text.take_new(final=final)
        if delta:
            if request.first_text_at is None:
                request.first_text_at = time.monotonic()
            request.on_text(delta)

    def _settle_dropped(self) -> None:
        """Answer the rows ``cancel`` took out of the queue (off the queue count already)."""
        with self._cond:
            dropped, self._dropped = self._dropped, []
        now = time.monotonic()
        for row in dropped:
            self._settle(row, "cancelled", now)

    def _end(self, row: _Row, reason: FinishReason | Ended, now: float) -> None:
        if reason == "timeout":
            late = "the answer took too long and was stopped"
            if row.request.started_at is None:
                late = "no answer in time: the queue was too long"
            self._fail(row, EngineTimeout(late))
            return
        if reason != "cancelled":  # flush what was held back (a stop string that never completed)
            row.text.finish()
            self._stream(row, final=True)
        self._settle(row, reason, now)

    def _settle(self, row: _Row, reason: FinishReason, now: float) -> None:
        request = row.request
        if request.done:
            return
        request.done = True
        started = request.started_at or now
        completion_tokens = len(row.text.tokens)
        answer = Answer(
            text=row.text.answer(),
            variant=request.variant,
            finish_reason=reason,
            prompt_tokens=len(row.prompt_ids or ()),
            completion_tokens=completion_tokens,
            queue_s=started - request.enqueued_at,
            first_token_s=(
                request.first_text_at - request.enqueued_at if request.first_text_at else None
            ),
            total_s=now - request.enqueued_at,
        )
        self.requests_served += 1
        self.tokens_generated += completion_tokens
        self._deliver(request, answer)

    def _fail(self, row: _Row, error: EngineError) -> None:
        if row.request.done:
            return
        row.request.done = True
        self._deliver(row.request, error)

    def _count_tokens(self, tokens: int) -> None:
        with self._cond:
            self._throughput.add(tokens)

    def _publish_running(self) -> None:
        """Let other threads see which rows run (for ``busy``, ``stop`` and ``wait_idle``)."""
        rows = [
            r for r in (self._batch.rows if self._batch is not None else []) if not r.request.done
        ]
        with self._cond:
            self._running = rows
            if not self.busy:
                self._cond.notify_all()

    def _gauge_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            metrics.GPU_MEMORY_BYTES.set(torch.cuda.memory_allocated())

    @staticmethod
    def _deliver(request: GenerationRequest, result: Answer | BaseException) -> None:
        try:
            request.on_done(result)
        except Exception:  # a caller's broken callback must not stop the worker
            log.exception("the callback of a finished request failed")
