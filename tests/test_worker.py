"""The inference worker: batching, mixed adapters, limits, cancellation and out-of-memory recovery.

The batching and mixed-adapter tests run the real tiny model (4-bit, adapter
unmerged); the limit tests use a scripted model that emits one token per
step, so timings are under the test's control.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from bot.serving.engine import Answer, EngineBusy, EngineError, EngineTimeout, EngineUnavailable
from bot.serving.local_engine import LocalEngine
from bot.serving.settings import EngineSettings
from bot.serving.worker import GenerationRequest, InferenceWorker
from finetune.generation import GenerationSettings
from finetune.modeling import load_for_inference, load_tokenizer

pytestmark = pytest.mark.timeout(120)

QUESTION = [{"role": "user", "content": "What skis should I get for park?"}]
GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path, tiny_adapter_dir: Path) -> tuple[Any, Any]:
    return load_for_inference(tiny_model_dir, tiny_adapter_dir, load_in_4bit=True)


class GenerateSpy:
    """Wraps a model's ``generate`` and records the batch size of every call."""

    def __init__(self, model: Any) -> None:
        self.real = model.generate
        self.batch_sizes: list[int] = []

    def __call__(self, **kwargs: Any) -> Any:
        self.batch_sizes.append(int(kwargs["input_ids"].shape[0]))
        return self.real(**kwargs)


async def test_concurrent_requests_are_served_in_fewer_generate_calls(
    loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
):
    model, _ = loaded
    spy = GenerateSpy(model)
    monkeypatch.setattr(model, "generate", spy)
    settings = EngineSettings(max_batch=8, batch_wait_ms=50, max_new_tokens=4, **GREEDY)
    engine = LocalEngine(settings, model_and_tokenizer=loaded)
    await engine.start()
    try:
        questions = [[{"role": "user", "content": f"Question {i} about wax?"}] for i in range(8)]
        answers = await asyncio.gather(
            *(engine.generate(q, variant="finetuned") for q in questions)
        )
    finally:
        await engine.close()
    assert all(isinstance(a, Answer) and a.completion_tokens > 0 for a in answers)
    assert sum(spy.batch_sizes) == 8
    assert len(spy.batch_sizes) < 8, spy.batch_sizes


async def test_mixed_batch_rows_match_each_variant_alone(
    loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
):
    model, _ = loaded
    spy = GenerateSpy(model)
    monkeypatch.setattr(model, "generate", spy)
    engine = LocalEngine(EngineSettings(max_new_tokens=10, **GREEDY), model_and_tokenizer=loaded)
    await engine.start()
    try:
        streamed: dict[str, str] = {"base": "", "finetuned": ""}

        def on_text(variant: str, delta: str) -> None:
            streamed[variant] += delta

        base, finetuned = await engine.compare(QUESTION, on_text=on_text)
        assert spy.batch_sizes == [2], "a compare is one batch of two rows"
        base_alone = await engine.generate(QUESTION, variant="base")
        finetuned_alone = await engine.generate(QUESTION, variant="finetuned")
    finally:
        await engine.close()
    assert (base.text, base.completion_tokens) == (base_alone.text, base_alone.completion_tokens)
    assert (finetuned.text, finetuned.completion_tokens) == (
        finetuned_alone.text,
        finetuned_alone.completion_tokens,
    )
    assert base.text != finetuned.text, "the adapter should change the greedy answer"
    assert streamed["base"].strip() == base.text
    assert streamed["finetuned"].strip() == finetuned.text


# ---- limits, against a scripted model -------------------------------------------------------


class ScriptedModel:
    """Stands in for a PeftModel: one token per step, honouring the streamer and stopping criteria."""

    peft_config: ClassVar[dict[str, Any]] = {
        "finetuned": None
    }  # looks like a model with the adapter attached
    device = torch.device("cpu")

    def __init__(
        self, token_id: int, step_s: float = 0.0, oom_calls: frozenset[int] = frozenset()
    ) -> None:
        self.token_id = token_id
        self.step_s = step_s
        self.oom_calls = oom_calls  # which calls (0 = the first) run out of memory
        self.batch_sizes: list[int] = []
        self.steps_run: list[int] = []

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def generate(self, *, input_ids, streamer, stopping_criteria, max_new_tokens, **_: Any):
        rows = input_ids.shape[0]
        self.batch_sizes.append(rows)
        if len(self.batch_sizes) - 1 in self.oom_calls:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        streamer.put(input_ids)
        unfinished = torch.ones(rows, dtype=torch.bool)
        steps = 0
        for _ in range(max_new_tokens):
            time.sleep(self.step_s)
            tokens = torch.full((rows,), self.token_id)
            ids = torch.cat([input_ids, tokens[:, None]], dim=1)
            for criterion in stopping_criteria:
                unfinished &= ~criterion(ids, None)
            streamer.put(tokens)
            steps += 1
            if not unfinished.any():
                break
        self.steps_run.append(steps)
        streamer.end()
        return None


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


def test_a_full_queue_answers_busy_at_once(tokenizer: Any):
    worker = InferenceWorker(
        ScriptedModel(1),
        tokenizer,
        generation=GenerationSettings(),
        adapter_name=None,
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
    assert model.batch_sizes == [], "an expired request must never reach the model"


async def test_a_request_past_its_deadline_mid_answer_is_stopped(tokenizer: Any):
    model = ScriptedModel(word_token(tokenizer), step_s=0.02)
    engine = scripted_engine(model, tokenizer, request_timeout_s=0.2, max_new_tokens=200)
    await engine.start()
    try:
        with pytest.raises(EngineTimeout):
            await asyncio.wait_for(engine.generate(QUESTION, variant="base"), 5)
    finally:
        await engine.close()
    assert model.steps_run and model.steps_run[0] < 50


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
    assert model.steps_run[0] < 100, "the cancelled row kept generating"
    assert answer.completion_tokens == 3 and answer.finish_reason == "length"


def test_a_cancelled_request_never_reaches_the_model(tokenizer: Any):
    model = ScriptedModel(word_token(tokenizer))
    worker = InferenceWorker(model, tokenizer, generation=GenerationSettings(), adapter_name=None)
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
    assert model.batch_sizes == [1]


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
    assert model.batch_sizes == [4, 2, 2]
    assert [a.completion_tokens for a in answers] == [3, 3, 3, 3]


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
    assert model.batch_sizes == [2, 1, 1, 1]
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
