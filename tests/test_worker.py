"""The inference worker: continuous batching, mixed adapters, limits, cancellation and out-of-memory recovery.

The batching, joining and mixed-adapter tests run the real tiny model
(4-bit, adapter unmerged) and compare every row with the same row alone,
token for token; the limit tests use a scripted model that emits one token
per step, so timings are under the test's control.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch

from bot.serving.engine import (
    Answer,
    EngineBusy,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    InvalidRequest,
    RequestTooLong,
    Sampling,
)
from bot.serving.local_engine import LocalEngine
from bot.serving.model_runner import ModelRunner, RowState
from bot.serving.settings import EngineSettings
from bot.serving.worker import GenerationRequest, InferenceWorker
from finetune.generation import GenerationSettings, encode_chats
from finetune.modeling import BASE_ADAPTER_NAME, load_for_inference, load_tokenizer

pytestmark = pytest.mark.timeout(120)

QUESTION = [{"role": "user", "content": "What skis should I get for park?"}]
LONG_QUESTION = [
    {
        "role": "user",
        "content": "I ski mostly groomers but want to try the park this winter, and my old "
        "skis are 190 cm cambered race skis from ten years ago. What should I look for in "
        "a first park ski, which length, and do I need new boots or bindings as well?",
    }
]
SHORT_QUESTION = [{"role": "user", "content": "Wax?"}]
GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path, tiny_adapter_dir: Path) -> tuple[Any, Any]:
    return load_for_inference(tiny_model_dir, tiny_adapter_dir, load_in_4bit=True)


def cache_of(kwargs: dict[str, Any]) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))


class ForwardSpy:
    """Wraps a model's ``forward``: records each call as ("prefill" | "decode", rows).

    ``fail_on`` names calls (0 = the first) that raise CUDA out-of-memory instead.
    """

    def __init__(self, model: Any, fail_on: frozenset[int] = frozenset()) -> None:
        self.real = model.forward
        self.fail_on = fail_on
        self.calls: list[tuple[str, int]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kind = "prefill" if cache_of(kwargs).get_seq_length() == 0 else "decode"
        self.calls.append((kind, int(kwargs["input_ids"].shape[0])))
        if len(self.calls) - 1 in self.fail_on:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.real(*args, **kwargs)

    @property
    def prefills(self) -> list[int]:
        return [rows for kind, rows in self.calls if kind == "prefill"]

    def decode_rows(self) -> list[int]:
        return [rows for kind, rows in self.calls if kind == "decode"]


def spied(model: Any, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> ForwardSpy:
    spy = ForwardSpy(model, **kwargs)
    monkeypatch.setattr(model, "forward", spy)
    return spy


def real_engine(loaded: tuple[Any, Any], **settings: Any) -> LocalEngine:
    return LocalEngine(EngineSettings(**{**GREEDY, **settings}), model_and_tokenizer=loaded)


def same(a: Answer, b: Answer) -> bool:
    return (a.text, a.completion_tokens, a.finish_reason) == (
        b.text,
        b.completion_tokens,
        b.finish_reason,
    )


async def test_concurrent_requests_are_prefilled_together_and_share_steps(
    loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
):
    model, _ = loaded
    spy = spied(model, monkeypatch)
    engine = real_engine(loaded, max_batch=8, batch_wait_ms=50, max_new_tokens=4)
    await engine.start()
    try:
        questions = [[{"role": "user", "content": f"Question {i} about wax?"}] for i in range(8)]
        answers = await asyncio.gather(
            *(engine.generate(q, variant="finetuned") for q in questions)
        )
    finally:
        await engine.close()
    assert all(isinstance(a, Answer) and a.completion_tokens > 0 for a in answers)
    assert sum(spy.prefills) == 8
    assert len(spy.prefills) < 8, spy.calls
    assert max(spy.decode_rows()) > 1, "the rows never shared a decoding step"


async def test_mixed_batch_rows_match_each_variant_alone(
    loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
):
    model, _ = loaded
    spy = spied(model, monkeypatch)
    engine = real_engine(loaded, max_new_tokens=10)
    await engine.start()
    try:
        streamed: dict[str, str] = {"base": "", "finetuned": ""}

        def on_text(variant: str, delta: str) -> None:
            streamed[variant] += delta

        base, finetuned = await engine.compare(QUESTION, on_text=on_text)
        compare_calls = list(spy.calls)
        base_alone = await engine.generate(QUESTION, variant="base")
        finetuned_alone = await engine.generate(QUESTION, variant="finetuned")
    finally:
        await engine.close()
    assert compare_calls[0] == ("prefill", 2), "a compare is one prefill of two rows"
    shared = min(base.completion_tokens, finetuned.completion_tokens) - 1
    assert [rows for _, rows in compare_calls[1 : 1 + shared]] == [2] * shared
    assert same(base, base_alone)
    assert same(finetuned, finetuned_alone)
    assert base.text != finetuned.text, "the adapter should change the greedy answer"
    assert streamed["base"] == base.text
    assert streamed["finetuned"] == finetuned.text


async def test_rows_joining_a_running_batch_answer_as_they_do_alone(
    loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
):
    """Left padding, masks and per-row positions: rows that join mid-answer — with prompts
    longer and shorter than the running row's — get the same greedy tokens as alone, base
    and finetuned rows alike, and so does the row they joined."""
    model, _ = loaded
    engine = real_engine(loaded, max_new_tokens=40, batch_wait_ms=0)
    await engine.start()
    try:
        runner_alone = await engine.generate(QUESTION, variant="finetuned")
        long_alone = await engine.generate(LONG_QUESTION, variant="base", max_new_tokens=12)
        short_alone = await engine.generate(SHORT_QUESTION, variant="finetuned", max_new_tokens=12)
        assert runner_alone.completion_tokens == 40, "the running row must outlast the joiners"

        spy = spied(model, monkeypatch)
        started = asyncio.Event()
        runner = asyncio.create_task(
            engine.generate(QUESTION, variant="finetuned", on_text=lambda _: started.set())
        )
        await asyncio.wait_for(started.wait(), 10)
        joined_long, joined_short = await asyncio.gather(
            engine.generate(LONG_QUESTION, variant="base", max_new_tokens=12),
            engine.generate(SHORT_QUESTION, variant="finetuned", max_new_tokens=12),
        )
        runner_joined = await runner
    finally:
        await engine.close()
    prefills = [i for i, (kind, _) in enumerate(spy.calls) if kind == "prefill"]
    assert prefills[0] == 0 and len(prefills) >= 2
    assert ("decode", 1) in spy.calls[: prefills[1]], "the joiners came before the runner decoded"
    assert any(rows >= 2 for kind, rows in spy.calls[prefills[1] :] if kind == "decode")
    assert same(runner_joined, runner_alone)
    assert same(joined_long, long_alone)
    assert same(joined_short, short_alone)


async def test_a_finished_row_leaves_the_batch_at_once(
    loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
):
    model, _ = loaded
    spy = spied(model, monkeypatch)
    engine = real_engine(loaded, max_new_tokens=30, batch_wait_ms=50)
    await engine.start()
    try:
        short = asyncio.create_task(engine.generate(QUESTION, variant="base", max_new_tokens=3))
        long = asyncio.create_task(engine.generate(LONG_QUESTION, variant="finetuned"))
        done, _ = await asyncio.wait({short, long}, return_when=asyncio.FIRST_COMPLETED)
        assert done == {short}, "the short answer waited for the long one"
        assert not long.done()
        long_answer = await long
    finally:
        await engine.close()
    assert short.result().completion_tokens == 3
    assert long_answer.completion_tokens == 30
    assert spy.calls[0] == ("prefill", 2)
    # 3 tokens: the first from the prefill, two steps together; then the long row runs alone.
    assert spy.decode_rows() == [2, 2] + [1] * 27


async def test_a_cancelled_row_leaves_mid_batch_and_the_other_rows_go_on(
    loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
):
    model, _ = loaded
    engine = real_engine(loaded, max_new_tokens=30, batch_wait_ms=50)
    await engine.start()
    try:
        kept_alone = await engine.generate(LONG_QUESTION, variant="base")
        spy = spied(model, monkeypatch)
        streamed = asyncio.Event()
        doomed = asyncio.create_task(
            engine.generate(QUESTION, variant="finetuned", on_text=lambda _: streamed.set())
        )
        kept = asyncio.create_task(engine.generate(LONG_QUESTION, variant="base"))
        await asyncio.wait_for(streamed.wait(), 10)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        kept_answer = await kept
    finally:
        await engine.close()
    assert same(kept_answer, kept_alone)
    rows = spy.decode_rows()
    assert rows[0] == 2 and rows[-1] == 1
    assert rows.count(2) < 25, "the cancelled row kept generating"


async def test_per_row_sampling_settings_do_not_leak_between_rows(loaded: tuple[Any, Any]):
    """A seeded row samples the same alone or beside others; greedy and penalised rows in
    the same steps keep their own settings."""
    engine = real_engine(loaded, max_new_tokens=16, batch_wait_ms=50)
    seeded = Sampling(temperature=1.0, top_p=0.95, seed=7)
    other_seed = Sampling(temperature=1.0, top_p=0.95, seed=8)
    # Below 1 the penalty favours what the row already holds: the random model's greedy
    # answer repeats nothing, so only this direction changes it for sure.
    penalised = Sampling(temperature=0.0, repetition_penalty=0.2)
    await engine.start()
    try:
        seeded_alone = await engine.generate(QUESTION, variant="base", sampling=seeded)
        again = await engine.generate(QUESTION, variant="base", sampling=seeded)
        other_alone = await engine.generate(QUESTION, variant="base", sampling=other_seed)
        greedy_alone = await engine.generate(QUESTION, variant="base")
        penalised_alone = await engine.generate(QUESTION, variant="base", sampling=penalised)
        together = await asyncio.gather(
            engine.generate(QUESTION, variant="base", sampling=seeded),
            engine.generate(QUESTION, variant="base", sampling=other_seed),
            engine.generate(QUESTION, variant="base"),
            engine.generate(QUESTION, variant="base", sampling=penalised),
            engine.generate(QUESTION, variant="base", sampling=Sampling(temperature=1.0)),
        )
    finally:
        await engine.close()
    assert same(seeded_alone, again), "a seed must make a sampled answer repeatable"
    assert seeded_alone.text != other_alone.text
    assert greedy_alone.text != penalised_alone.text, "the penalty should change this answer"
    assert seeded_alone.text != greedy_alone.text
    assert same(together[0], seeded_alone)
    assert same(together[1], other_alone)
    assert same(together[2], greedy_alone)
    assert same(together[3], penalised_alone)


async def test_a_requests_stop_string_ends_its_answer_before_it_alone_and_in_a_busy_batch(
    loaded: tuple[Any, Any],
):
    """The answer ends right before the request's own stop string, which is never streamed;
    the rows beside it keep their full answers."""
    engine = real_engine(loaded, max_new_tokens=24, batch_wait_ms=50)
    await engine.start()
    try:
        full = await engine.generate(QUESTION, variant="base")
        middle = len(full.text) // 2
        stop = full.text[middle - 3 : middle + 3]
        assert stop.strip(), f"pick a stop from text, not spaces: {full.text!r}"
        expected = full.text[: full.text.find(stop)].strip()
        stopping = Sampling(stop=(stop,))
        streamed: list[list[str]] = [[], []]
        alone = await engine.generate(
            QUESTION, variant="base", sampling=stopping, on_text=streamed[0].append
        )
        together = await asyncio.gather(
            engine.generate(LONG_QUESTION, variant="finetuned"),
            engine.generate(
                QUESTION, variant="base", sampling=stopping, on_text=streamed[1].append
            ),
            engine.generate(QUESTION, variant="base"),
        )
    finally:
        await engine.close()
    for answer, deltas in ((alone, streamed[0]), (together[1], streamed[1])):
        assert (answer.text, answer.finish_reason) == (expected, "stop")
        assert "".join(deltas) == expected and stop not in "".join(deltas)
    assert same(together[2], full), "a stop string must not leak into another row"


async def test_a_question_longer_than_the_token_budget_is_refused_clearly(
    loaded: tuple[Any, Any],
):
    engine = real_engine(loaded, max_batch_tokens=96, max_new_tokens=8)
    await engine.start()
    try:
        with pytest.raises(RequestTooLong) as refused:
            await engine.generate([{"role": "user", "content": "powder " * 200}])
        # A long chat is trimmed, oldest turns first, until it fits rather than refused.
        chat = []
        for i in range(8):
            chat += [
                {"role": "user", "content": f"Earlier question {i} about boots and wax?"},
                {"role": "assistant", "content": f"Earlier answer {i} about boots and wax."},
            ]
        answer = await engine.generate([*chat, *QUESTION], variant="base")
    finally:
        await engine.close()
    message = str(refused.value)
    assert "too long" in message and "96" in message and "\n" not in message
    assert 0 < answer.prompt_tokens <= 96 - 8


async def test_the_token_budget_decides_how_many_rows_run_together(
    loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
):
    model, tokenizer = loaded
    prompt = encode_chats(tokenizer, [QUESTION])["input_ids"].shape[1]
    spy = spied(model, monkeypatch)
    # Room for two rows of prompt + 6 tokens, not three.
    engine = real_engine(
        loaded, max_new_tokens=6, max_batch=8, batch_wait_ms=50, max_batch_tokens=2 * prompt + 14
    )
    await engine.start()
    try:
        answers = await asyncio.gather(
            *(engine.generate(QUESTION, variant="base") for _ in range(4))
        )
    finally:
        await engine.close()
    assert [a.completion_tokens for a in answers] == [6] * 4
    assert max(spy.decode_rows()) == 2
    assert sum(spy.prefills) == 4


async def test_out_of_memory_mid_answer_resumes_every_row_where_it_was(
    loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
):
    """The batch is rebuilt from each row's prompt and answer so far: the same answers, and
    no text streamed twice."""
    model, _ = loaded
    engine = real_engine(loaded, max_new_tokens=12, batch_wait_ms=50)
    questions = [QUESTION, LONG_QUESTION, SHORT_QUESTION]
    await engine.start()
    try:
        alone = await asyncio.gather(*(engine.generate(q, variant="base") for q in questions))
        spy = spied(model, monkeypatch, fail_on=frozenset({5}))  # a decoding step
        streams: list[list[str]] = [[], [], []]
        again = await asyncio.gather(
            *(
                engine.generate(q, variant="base", on_text=streams[i].append)
                for i, q in enumerate(questions)
            )
        )
    finally:
        await engine.close()
    assert spy.calls[5] == ("decode", 3)
    assert [same(a, b) for a, b in zip(alone, again, strict=True)] == [True] * 3
    assert ["".join(s) for s in streams] == [a.text for a in again]
    assert sum(spy.prefills) > 3, "the rows were never prefilled again"


# ---- limits, against a scripted model -------------------------------------------------------


class ScriptedModel:
    """Stands in for a PeftModel: the same token every step, one cache layer, optional OOMs."""

    peft_config: ClassVar[dict[str, Any]] = {
        "finetuned": None
    }  # looks like a model with the adapter attached
    device = torch.device("cpu")

    def __init__(
        self, token_id: int, step_s: float = 0.0, oom_calls: frozenset[int] = frozenset()
    ) -> None:
        self.token_id = token_id
        self.step_s = step_s
        self.oom_calls = oom_calls  # which forward calls (0 = the first) run out of memory
        self.calls: list[tuple[str, int]] = []
        self.bad_positions = 0

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def forward(self, *, input_ids, attention_mask, position_ids, cache, **_: Any) -> Any:
        rows, length = input_ids.shape
        self.calls.append(("prefill" if cache.get_seq_length() == 0 else "decode", rows))
        if len(self.calls) - 1 in self.oom_calls:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if not torch.equal(position_ids[:, -1], attention_mask.sum(dim=1) - 1):
            self.bad_positions += 1
        time.sleep(self.step_s)
        state = torch.zeros(rows, 1, length, 2)
        cache.update(state, state.clone(), 0)
        logits = torch.zeros(rows, length, 1024)
        logits[..., self.token_id] = 10.0
        return SimpleNamespace(logits=logits)

    __call__ = forward

    @property
    def prefills(self) -> list[int]:
        return [rows for kind, rows in self.calls if kind == "prefill"]

    @property
    def steps(self) -> int:
        return sum(kind == "decode" for kind, _ in self.calls)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir)


def word_token(tokenizer: Any) -> int:
    return tokenizer(" snow", add_special_tokens=False)["input_ids"][-1]


def scripted_engine(model: ScriptedModel, tokenizer: Any, **settings: Any) -> LocalEngine:
    return LocalEngine(EngineSettings(**settings), model_and_tokenizer=(model, tokenizer))


def request(on_done, *, deadline_s: float = 30.0, max_new_tokens: int = 4) -> GenerationRequest:
    return GenerationRequest(
        messages=QUESTION,
        variant="base",
        max_new_tokens=max_new_tokens,
        deadline=time.monotonic() + deadline_s,
        on_done=on_done,
    )


class Results(dict[str, Any]):
    """Each named request's result (an Answer or the error), and ``done`` once all are in."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected = expected
        self.done = threading.Event()

    def keep(self, name: str) -> Any:
        def on_done(result: Any) -> None:
            self[name] = result
            if len(self) == self.expected:
                self.done.set()

        return on_done


def test_a_full_queue_answers_busy_at_once(tokenizer: Any):
    worker = InferenceWorker(
        ScriptedModel(1),
        tokenizer,
        generation=GenerationSettings(),
        queue_size=2,
    )  # never started: nothing leaves the queue
    worker.submit(request(print))
    worker.submit(request(print))
    started = time.monotonic()
    with pytest.raises(EngineBusy) as busy:
        worker.submit(request(print))
    assert time.monotonic() - started < 0.1
    assert busy.value.retry_after_s > 0
    assert worker.queue_depth == 2


async def test_a_request_past_its_deadline_in_the_queue_times_out(tokenizer: Any):
    model = ScriptedModel(word_token(tokenizer))
    engine = scripted_engine(model, tokenizer, request_timeout_s=0.0)
    await engine.start()
    try:
        with pytest.raises(EngineTimeout):
            await engine.generate(QUESTION, variant="base")
    finally:
        await engine.close()
    assert model.calls == [], "an expired request must never reach the model"


async def test_a_request_past_its_deadline_mid_answer_is_stopped(tokenizer: Any):
    model = ScriptedModel(word_token(tokenizer), step_s=0.02)
    engine = scripted_engine(model, tokenizer, request_timeout_s=0.2, max_new_tokens=200)
    await engine.start()
    try:
        with pytest.raises(EngineTimeout):
            await asyncio.wait_for(engine.generate(QUESTION, variant="base"), 5)
    finally:
        await engine.close()
    assert 0 < model.steps < 50


def test_a_row_past_its_deadline_leaves_and_its_batch_goes_on(tokenizer: Any):
    """The late row's deadline passes after its third piece of text, whatever the pace."""
    model = ScriptedModel(word_token(tokenizer))
    worker = InferenceWorker(model, tokenizer, generation=GenerationSettings())
    results = Results(expected=2)
    late = request(results.keep("late"), max_new_tokens=200)
    deltas: list[str] = []

    def expire_after_three(delta: str) -> None:
        deltas.append(delta)
        if len(deltas) == 3:
            late.deadline = time.monotonic() - 1

    late.on_text = expire_after_three
    worker.submit(late)
    worker.submit(request(results.keep("kept"), max_new_tokens=40))
    worker.start()
    assert results.done.wait(10)
    worker.stop(cancel=False, timeout=10)
    assert isinstance(results["late"], EngineTimeout)
    assert results["kept"].completion_tokens == 40
    decode_rows = [rows for kind, rows in model.calls if kind == "decode"]
    assert decode_rows[:2] == [2, 2] and decode_rows[-1] == 1
    assert model.bad_positions == 0


async def test_a_cancelled_request_leaves_its_batch_and_the_worker_goes_on(tokenizer: Any):
    model = ScriptedModel(word_token(tokenizer), step_s=0.01)
    engine = scripted_engine(model, tokenizer, max_new_tokens=300, batch_wait_ms=0)
    await engine.start()
    try:
        first_text = asyncio.Event()
        task = asyncio.create_task(
            engine.generate(QUESTION, variant="base", on_text=lambda _: first_text.set())
        )
        await asyncio.wait_for(first_text.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        answer = await asyncio.wait_for(
            engine.generate(QUESTION, variant="finetuned", max_new_tokens=3), 5
        )
    finally:
        await engine.close()
    second_prefill = model.calls.index(("prefill", 1), 1)
    assert second_prefill - 1 < 100, "the cancelled row kept generating"
    assert answer.completion_tokens == 3 and answer.finish_reason == "length"


def test_a_cancelled_request_never_reaches_the_model(tokenizer: Any):
    model = ScriptedModel(word_token(tokenizer))
    worker = InferenceWorker(model, tokenizer, generation=GenerationSettings())
    results: list[Any] = []
    done = threading.Event()
    queued = request(results.append)
    worker.submit(queued)
    worker.cancel(queued)
    worker.submit(request(lambda r: (results.append(r), done.set())))
    worker.start()
    assert done.wait(10)
    worker.stop(cancel=False, timeout=10)
    assert results[0].finish_reason == "cancelled"
    assert results[1].completion_tokens == 4
    assert model.prefills == [1]


async def test_out_of_memory_splits_the_batch_and_retries(tokenizer: Any):
    model = ScriptedModel(word_token(tokenizer), oom_calls=frozenset({0}))
    engine = scripted_engine(model, tokenizer, max_batch=4, batch_wait_ms=50, max_new_tokens=3)
    await engine.start()
    try:
        answers = await asyncio.wait_for(
            asyncio.gather(*(engine.generate(QUESTION, variant="base") for _ in range(4))), 10
        )
    finally:
        await engine.close()
    assert model.prefills == [4, 2, 2]
    assert [a.completion_tokens for a in answers] == [3, 3, 3, 3]
    assert model.bad_positions == 0


async def test_a_single_row_out_of_memory_fails_clearly_and_the_worker_lives_on(tokenizer: Any):
    model = ScriptedModel(word_token(tokenizer), oom_calls=frozenset({0, 1}))
    engine = scripted_engine(model, tokenizer, max_batch=2, batch_wait_ms=50, max_new_tokens=3)
    await engine.start()
    try:
        results = await asyncio.wait_for(
            asyncio.gather(
                engine.generate(QUESTION, variant="base"),
                engine.generate(QUESTION, variant="base"),
                return_exceptions=True,
            ),
            10,
        )
        later = await asyncio.wait_for(engine.generate(QUESTION, variant="base"), 5)
    finally:
        await engine.close()
    assert model.prefills == [2, 1, 1, 1]
    assert isinstance(results[0], EngineError) and "out of memory" in str(results[0])
    assert isinstance(results[1], Answer) and results[1].completion_tokens == 3
    assert later.completion_tokens == 3


async def test_closing_refuses_new_questions(tokenizer: Any):
    engine = scripted_engine(ScriptedModel(word_token(tokenizer)), tokenizer)
    await engine.start()
    engine.worker.stop_accepting()
    with pytest.raises(EngineUnavailable):
        await engine.generate(QUESTION, variant="base")
    await engine.close()
    assert not engine.status().ready


# ---- a bad request fails alone -----------------------------------------------------------------

POISONED = {
    "an assistant turn longer than the budget": [
        *QUESTION,
        {"role": "assistant", "content": "powder " * 400},
    ],
    "a lone surrogate": [{"role": "user", "content": "\ud800x"}],
}


@pytest.mark.parametrize("poison", POISONED)
def test_a_request_that_cannot_be_prepared_fails_alone_and_the_queue_goes_on(
    tokenizer: Any, poison: str
):
    """It fails with its own clear error; the row already streaming and the one queued behind
    it are answered in full."""
    model = ScriptedModel(word_token(tokenizer), step_s=0.005)
    worker = InferenceWorker(
        model, tokenizer, generation=GenerationSettings(), max_batch_tokens=128
    )
    results = Results(expected=3)
    streaming = threading.Event()
    running = request(results.keep("running"), max_new_tokens=60)
    running.on_text = lambda _: streaming.set()
    worker.submit(running)
    worker.start()
    assert streaming.wait(10)
    bad = request(results.keep("bad"))
    bad.messages = POISONED[poison]
    worker.submit(bad)
    worker.submit(request(results.keep("behind"), max_new_tokens=5))
    assert results.done.wait(10), f"stuck: only {sorted(results)} answered"
    worker.stop(cancel=False, timeout=10)
    assert isinstance(results["bad"], InvalidRequest)
    assert "\n" not in str(results["bad"])
    assert results["running"].completion_tokens == 60
    assert results["behind"].completion_tokens == 5
    assert worker.queue_depth == 0
    assert worker.health(stall_s=60)[0] == "stopped"


def test_a_sampling_setting_that_breaks_the_kernel_ends_its_row_alone(tokenizer: Any):
    """A temperature so small the logits overflow makes sampling raise for the whole batch;
    only that row ends."""
    model = ScriptedModel(word_token(tokenizer))
    worker = InferenceWorker(model, tokenizer, generation=GenerationSettings(), batch_wait_s=0.5)
    results = Results(expected=2)
    broken, fine = (
        request(results.keep("broken"), max_new_tokens=6),
        request(results.keep("fine"), max_new_tokens=6),
    )
    broken.sampling = Sampling(temperature=1e-300, top_p=1.0, repetition_penalty=1.0)
    fine.sampling = Sampling(temperature=0.7, top_p=1.0, repetition_penalty=1.0)
    worker.submit(broken, fine)
    worker.start()
    assert results.done.wait(10)
    worker.stop(cancel=False, timeout=10)
    assert model.prefills == [2], "both rows shared the batch"
    assert isinstance(results["broken"], InvalidRequest)
    assert results["fine"].completion_tokens == 6


def test_a_cancelled_queued_request_leaves_the_queue_count_at_once(tokenizer: Any):
    worker = InferenceWorker(
        ScriptedModel(word_token(tokenizer)),
        tokenizer,
        generation=GenerationSettings(),
        queue_size=3,
    )  # not started: nothing leaves the queue but by cancelling
    results: list[Any] = []
    queued = [request(results.append) for _ in range(3)]
    for each in queued:
        worker.submit(each)
    worker.cancel(queued[1])
    assert worker.queue_depth == 2
    worker.submit(request(results.append))  # the freed place takes a new question
    assert worker.queue_depth == 3
    worker.start()
    assert worker.wait_idle(10)
    worker.stop(cancel=False, timeout=10)
    assert sorted(a.finish_reason for a in results) == ["cancelled", "length", "length", "length"]


def test_trimming_a_long_conversation_costs_a_few_encodes_not_one_per_turn(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
):
    """A 1,000-turn chat was once trimmed by encoding it again for each dropped turn, on the
    worker thread, between other users' decoding steps."""
    model = ScriptedModel(word_token(tokenizer))
    worker = InferenceWorker(
        model, tokenizer, generation=GenerationSettings(), max_batch_tokens=200
    )
    encodes: list[int] = []
    real_encode = worker.runner.encode
    monkeypatch.setattr(
        worker.runner,
        "encode",
        lambda messages: encodes.append(len(messages)) or real_encode(messages),
    )
    chat = []
    for i in range(500):
        chat += [
            {"role": "user", "content": f"Question {i} about wax and edges?"},
            {"role": "assistant", "content": f"Answer {i}: wax often, sharpen twice a season."},
        ]
    chat.append({"role": "user", "content": "And for park skis?"})
    answers: list[Any] = []
    worker.submit(_with(chat, answers))
    worker.start()
    assert worker.wait_idle(30)
    worker.stop(cancel=False, timeout=10)
    (answer,) = answers
    assert isinstance(answer, Answer), answer
    assert 0 < answer.prompt_tokens <= 200 - 8
    assert len(encodes) <= 4, f"{len(encodes)} encodes"
    kept = encodes[-1]
    assert kept > 1, "more than the question fits, and is kept"


def _with(messages: list[dict[str, str]], answers: list[Any]) -> GenerationRequest:
    queued = request(answers.append, max_new_tokens=8)
    queued.messages = messages
    return queued


async def test_healthz_state_follows_the_worker_loop(tokenizer: Any):
    """The engine's status says "stalled" while a step takes longer than WORKER_STALL_S,
    "ok" when idle, "stopped" once closed."""
    model = ScriptedModel(word_token(tokenizer), step_s=0.3)
    engine = scripted_engine(model, tokenizer, worker_stall_s=0.1, max_new_tokens=4)
    await engine.start()
    try:
        assert engine.status().worker == "ok"
        task = asyncio.create_task(engine.generate(QUESTION, variant="base"))
        states = set()
        while not task.done():
            states.add(engine.status().worker)
            await asyncio.sleep(0.02)
        await task
        assert "stalled" in states
        assert engine.status().worker == "ok", "idle again"
    finally:
        await engine.close()
    assert engine.status().worker == "stopped"


def test_a_worker_whose_every_step_raises_reports_failing(tokenizer: Any):
    class BrokenModel(ScriptedModel):
        def forward(self, **kwargs: Any) -> Any:
            raise RuntimeError("a broken kernel")

        __call__ = forward

    worker = InferenceWorker(
        BrokenModel(word_token(tokenizer)),
        tokenizer,
        generation=GenerationSettings(),
    )
    worker.start()
    results: list[Any] = []
    for _ in range(3):
        worker.submit(request(results.append))
        assert worker.wait_idle(10)
    state, _ = worker.health(stall_s=60)
    worker.stop(cancel=False, timeout=10)
    assert all(isinstance(r, EngineError) for r in results) and len(results) == 3
    assert state == "failing"


class RoutedModel(ScriptedModel):
    """A stand-in for a PeftModel with several adapters that records how each pass was routed:
    "off", the active adapter's name, or peft's per-row names."""

    def __init__(self, token_id: int) -> None:
        super().__init__(token_id)
        self.active_adapter = "a"
        self.off = False
        self.names: list[str] | None = None
        self.routes: list[str | list[str]] = []

    @contextlib.contextmanager
    def disable_adapter(self) -> Any:
        self.off = True
        yield
        self.off = False

    def set_adapter(self, name: str) -> None:
        self.active_adapter = name

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, adapter_names: list[str]) -> Any:
        self.names = adapter_names
        yield
        self.names = None

    def forward(self, *, cache: Any, **kwargs: Any) -> Any:
        self.routes.append("off" if self.off else self.names or self.active_adapter)
        return super().forward(cache=cache, **kwargs)

    __call__ = forward


def test_the_runner_routes_each_row_to_its_named_adapter(tokenizer: Any):
    """Rows carry an adapter name, and the runner assumes no fixed set of them: one name
    activates that adapter, the base name turns adapters off, a mix routes per row."""
    model = RoutedModel(word_token(tokenizer))
    runner = ModelRunner(model, tokenizer, generation=GenerationSettings())

    def rows(*names: str) -> list[RowState]:
        return [
            RowState(adapter=name, max_new_tokens=4, text=runner.row_text(None), prompt_ids=[1, 2])
            for name in names
        ]

    mixed = ["a", "b", BASE_ADAPTER_NAME]
    for names in (["a", "a"], ["b"], [BASE_ADAPTER_NAME] * 2, mixed, ["b"]):
        runner.prefill(rows(*names))
    runner.restore()
    assert model.routes == ["a", "b", "off", mixed, "b"]
    assert (model.off, model.names) == (False, None), "the model is left as it was given"
