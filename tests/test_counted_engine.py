"""The Engine boundary counts every request once, the same way for every backend.

These drive :class:`CountedEngine` over the scripted engine: what it counts
comes only from what the caller gets (an answer or an exception), so a busy
backend is ``outcome="busy"`` whether the local queue or a remote server was full.
"""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from bot.serving.engine import (
    VARIANTS,
    EngineBusy,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    Message,
    Sampling,
)
from bot.serving.metrics import CountedEngine
from tests.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.timeout(30)

QUESTION: list[Message] = [{"role": "user", "content": "how stiff should park boots be"}]


def answers(variant: str, outcome: str) -> float:
    labels = {"variant": variant, "outcome": outcome}
    return REGISTRY.get_sample_value("freeski_answers_total", labels) or 0.0


def tokens(variant: str) -> float:
    return REGISTRY.get_sample_value("freeski_generated_tokens_total", {"variant": variant}) or 0.0


def first_tokens_observed() -> float:
    return REGISTRY.get_sample_value("freeski_time_to_first_token_seconds_count") or 0.0


async def counted_scripted(**kwargs: object) -> tuple[CountedEngine, ScriptedEngine]:
    backend = ScriptedEngine(**kwargs)  # type: ignore[arg-type]
    engine = CountedEngine(backend)
    await engine.start()
    return engine, backend


async def test_a_busy_engine_is_counted_as_busy() -> None:
    engine, backend = await counted_scripted()
    backend.failures = [EngineBusy(retry_after_s=3)]
    before = {outcome: answers("finetuned", outcome) for outcome in ("busy", "error")}
    with pytest.raises(EngineBusy):
        await engine.generate(QUESTION)
    assert answers("finetuned", "busy") == before["busy"] + 1
    assert answers("finetuned", "error") == before["error"]


@pytest.mark.parametrize(
    ("failure", "outcome"),
    [
        (EngineTimeout("too slow"), "timeout"),
        (EngineUnavailable("gone"), "unavailable"),
        (EngineError("broke"), "error"),
    ],
)
async def test_each_failure_is_counted_by_its_kind(failure: EngineError, outcome: str) -> None:
    engine, backend = await counted_scripted()
    backend.failures = [failure]
    before = answers("base", outcome)
    with pytest.raises(type(failure)):
        await engine.generate(QUESTION, variant="base")
    assert answers("base", outcome) == before + 1


async def test_an_answer_is_counted_once_with_its_tokens_and_first_token() -> None:
    engine, _ = await counted_scripted()
    before = (answers("base", "length"), tokens("base"), first_tokens_observed())
    answer = await engine.generate(QUESTION, variant="base", max_new_tokens=3)
    assert answer.finish_reason == "length" and answer.completion_tokens == 3
    after = (answers("base", "length"), tokens("base"), first_tokens_observed())
    assert after == (before[0] + 1, before[1] + 3, before[2] + 1)


async def test_compare_counts_one_answer_per_variant() -> None:
    engine, _ = await counted_scripted()
    before = {variant: answers(variant, "stop") for variant in VARIANTS}
    base, finetuned = await engine.compare(QUESTION)
    assert (base.finish_reason, finetuned.finish_reason) == ("stop", "stop")
    assert {variant: answers(variant, "stop") for variant in VARIANTS} == {
        variant: count + 1 for variant, count in before.items()
    }


async def test_a_failed_compare_counts_the_failure_for_both_variants() -> None:
    engine, backend = await counted_scripted()
    backend.failures = [EngineBusy(retry_after_s=1), EngineBusy(retry_after_s=1)]
    before = {variant: answers(variant, "busy") for variant in VARIANTS}
    with pytest.raises(EngineBusy):
        await engine.compare(QUESTION)
    assert {variant: answers(variant, "busy") for variant in VARIANTS} == {
        variant: count + 1 for variant, count in before.items()
    }


async def test_a_caller_that_gives_up_is_counted_as_cancelled() -> None:
    engine, backend = await counted_scripted(step_s=0.05)
    before = answers("finetuned", "cancelled")
    task = asyncio.ensure_future(engine.generate(QUESTION))
    await asyncio.sleep(0.08)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.cancelled == 1
    assert answers("finetuned", "cancelled") == before + 1


async def test_sampling_and_every_other_argument_reach_the_backend() -> None:
    engine, backend = await counted_scripted()
    asked = Sampling(temperature=0.0, top_p=0.5, seed=7, stop=("\n\n",))
    await engine.generate(QUESTION, variant="base", max_new_tokens=3, sampling=asked)
    await engine.compare(QUESTION, max_new_tokens=2, sampling=asked)
    assert backend.samplings == [asked, asked, asked]
    assert [(variant, limit) for variant, _, limit in backend.requests] == [
        ("base", 3),
        ("base", 2),
        ("finetuned", 2),
    ]


async def test_status_start_and_close_are_the_backends() -> None:
    engine, backend = await counted_scripted()
    await engine.generate(QUESTION)
    status = engine.status()
    assert (status.backend, status.model, status.ready) == ("scripted", "scripted-base", True)
    assert status.requests_served == backend.status().requests_served == 1
    await engine.close()
    assert backend.ready is False and engine.status().ready is False
