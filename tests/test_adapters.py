"""Several adapters from one base: served at once, loaded and unloaded while answers stream.

Three adapters made differently (rank, alpha, target modules, one with a
trained ``lm_head`` copy) on the tiny model, 4-bit on the CPU as in
production. Random LoRA weights with large B matrices stand in for training:
what is tested is that each row answers exactly as its adapter does alone,
whenever that adapter was loaded and whatever else is loaded beside it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.serving.adapters import ServedModels
from bot.serving.engine import AdapterRejected, Answer, InvalidRequest, Message, UnknownModel
from bot.serving.local_engine import LocalEngine
from bot.serving.settings import EngineSettings
from finetune.errors import UserError

pytestmark = pytest.mark.timeout(300)

QUESTION: list[Message] = [{"role": "user", "content": "Which skis for park and pipe?"}]
OTHER: list[Message] = [{"role": "user", "content": "How do I wax my board at home?"}]
ANSWER_TOKENS = 24
GREEDY = {"temperature": 0.0, "repetition_penalty": 1.0, "max_new_tokens": ANSWER_TOKENS}


@pytest.fixture(scope="module")
def adapters(tiny_adapters: dict[str, Path]) -> dict[str, Path]:
    return tiny_adapters


def settings(base: Path, adapters: dict[str, Path], **more: Any) -> EngineSettings:
    specs = ",".join(f"{name}={path}" for name, path in adapters.items())
    from bot.serving.adapters import parse_adapters

    return EngineSettings(
        base_model=str(base),
        adapters=parse_adapters(specs) if specs else (),
        load_in_4bit=True,
        **{**GREEDY, **more},
    )


async def started(settings: EngineSettings) -> LocalEngine:
    engine = LocalEngine(settings)
    await engine.start()
    return engine


@pytest.fixture
async def engine_of(tiny_model_dir: Path) -> AsyncIterator[Any]:
    """Start engines over the tiny base with the given adapters; all closed at the end."""
    engines: list[LocalEngine] = []

    async def start(adapters: dict[str, Path], **more: Any) -> LocalEngine:
        engine = await started(settings(tiny_model_dir, adapters, **more))
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        await engine.close()


def key(answer: Answer) -> tuple[str, int, str]:
    return answer.text, answer.completion_tokens, answer.finish_reason


async def alone(engine: LocalEngine, names: list[str]) -> dict[str, tuple[str, int, str]]:
    """Each model's answer to QUESTION, asked one at a time."""
    return {
        name: key(await engine.generate(QUESTION, variant=name, max_new_tokens=ANSWER_TOKENS))
        for name in names
    }


async def test_three_adapters_answer_as_alone_also_in_one_batch(
    engine_of: Any, adapters: dict[str, Path]
):
    engine = await engine_of(adapters)
    models = engine.models()
    assert models.names == ("base", "finetuned", "v1", "v2", "v3")
    assert models.default == "v1", "the first listed"
    assert all(a.weights_hash for a in models.adapters)
    names = ["base", "v1", "v2", "v3"]
    single = await alone(engine, names)
    assert len(set(single.values())) == 4, f"every adapter should answer its own way: {single}"
    batched = await asyncio.gather(*(engine.generate(QUESTION, variant=n) for n in names * 2))
    assert [key(a) for a in batched] == [single[n] for n in names * 2]
    finetuned = await engine.generate(QUESTION)
    assert key(finetuned) == single["v1"]
    assert (finetuned.variant, finetuned.adapter and finetuned.adapter.name) == ("finetuned", "v1")
    first, second = await engine.compare(QUESTION, models=("v3", "v2"))
    assert (key(first), key(second)) == (single["v3"], single["v2"])
    assert (first.variant, second.variant) == ("v3", "v2")


async def test_an_adapter_loaded_at_runtime_answers_as_at_start_and_changes_no_other(
    engine_of: Any, adapters: dict[str, Path]
):
    """The 4-bit base on a CPU repacks its weights after the first pass: loading an adapter
    then must still leave every other answer as it was, and answer as if loaded at start."""
    at_start = await alone(await engine_of(adapters), ["base", "v1", "v2", "v3"])
    engine = await engine_of({"v1": adapters["v1"]}, max_new_tokens=64)
    before = await alone(engine, ["base", "v1"])
    assert before == {n: at_start[n] for n in ("base", "v1")}

    deltas: list[float] = []
    flowing = asyncio.Event()

    def arrived(_: str) -> None:
        deltas.append(time.monotonic())
        flowing.set()

    streaming = asyncio.ensure_future(
        engine.generate(OTHER, variant="v1", max_new_tokens=64, on_text=arrived)
    )
    await flowing.wait()  # the stream is running before the load starts
    loading_from = time.monotonic()
    served = await engine.load_adapter("v2", adapters["v2"])
    loading_until = time.monotonic()
    await engine.load_adapter("v3", str(adapters["v3"]))
    streamed = await streaming
    reference = await (await engine_of({"v1": adapters["v1"]}, max_new_tokens=64)).generate(
        OTHER, variant="v1", max_new_tokens=64
    )
    assert key(streamed) == key(reference), "the stream went on as if nothing was loaded"
    during = [b - a for a, b in itertools.pairwise(deltas) if b >= loading_from]
    logging.getLogger(__name__).info(
        "loading v2 took %.3f s; the longest pause of the stream meanwhile: %.3f s",
        loading_until - loading_from,
        max(during, default=0.0),
    )

    assert served.name == "v2" and served.weights_hash == engine.models().adapter("v2").weights_hash  # type: ignore[union-attr]
    assert engine.models().names == ("base", "finetuned", "v1", "v2", "v3")
    assert await alone(engine, ["base", "v1", "v2", "v3"]) == at_start


async def test_a_loading_adapters_stacks_are_built_while_answers_keep_decoding(
    engine_of: Any, adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
):
    """The batched-LoRA stacks of an adapter being loaded are built off the worker's thread:
    held back there, they keep the adapter unserved while a whole answer runs to its end."""
    import threading

    from bot.serving.batched_lora import Stacking

    at_start = await alone(await engine_of(adapters), ["v1", "v2"])
    engine = await engine_of({"v1": adapters["v1"]})
    streamed_alone = key(await engine.generate(OTHER, variant="v1"))
    building = threading.Event()
    go_on = threading.Event()
    threads: list[str] = []
    build = Stacking.build

    def held_build(self: Stacking) -> Any:
        threads.append(threading.current_thread().name)
        building.set()
        go_on.wait(60)
        return build(self)

    monkeypatch.setattr(Stacking, "build", held_build)
    loading = asyncio.ensure_future(engine.load_adapter("v2", adapters["v2"]))
    assert await asyncio.to_thread(building.wait, 60), "the stacks were never built"
    answer = await asyncio.wait_for(engine.generate(OTHER, variant="v1"), 60)
    assert key(answer) == streamed_alone, "a whole answer ran while the stacks were held"
    assert not loading.done() and "v2" not in engine.models().names, "not served before its stacks"
    with pytest.raises(UnknownModel):
        await engine.generate(QUESTION, variant="v2")
    go_on.set()
    await loading
    assert "inference-worker" not in threads
    assert await alone(engine, ["v1", "v2"]) == at_start


async def test_unloading_lets_running_answers_finish_and_changes_no_other(
    engine_of: Any, adapters: dict[str, Path]
):
    engine = await engine_of(adapters, max_new_tokens=48)
    single = await alone(engine, ["base", "v1", "v3"])
    v2_alone = key(await engine.generate(OTHER, variant="v2", max_new_tokens=48))
    flowing = asyncio.Event()
    running = asyncio.ensure_future(
        engine.generate(OTHER, variant="v2", max_new_tokens=48, on_text=lambda _: flowing.set())
    )
    await flowing.wait()
    unloading = asyncio.ensure_future(engine.unload_adapter("v2"))
    await asyncio.sleep(0.05)
    with pytest.raises(UnknownModel, match="'v2'"):  # refused at once, while the other runs
        await engine.generate(QUESTION, variant="v2")
    assert key(await running) == v2_alone, "the answer already running finished as it would"
    await unloading
    assert "v2" not in engine.models().names
    with pytest.raises(UnknownModel):
        await engine.unload_adapter("v2")
    assert await alone(engine, ["base", "v1", "v3"]) == single
    await engine.load_adapter("v2", adapters["v2"])  # the name is free again
    assert key(await engine.generate(OTHER, variant="v2", max_new_tokens=48)) == v2_alone


async def test_bad_loads_and_unloads_are_refused_clearly(
    engine_of: Any,
    adapters: dict[str, Path],
    other_base_adapter: Path,
    tiny_model_dir: Path,
    tmp_path: Path,
):
    import shutil

    # The same adapter claiming the served base: its shapes still give it away.
    disguised = shutil.copytree(other_base_adapter, tmp_path / "disguised")
    config = json.loads((disguised / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_model_dir)
    (disguised / "adapter_config.json").write_text(json.dumps(config))
    engine = await engine_of({"v1": adapters["v1"]})
    before = await alone(engine, ["base", "v1"])
    refusals = [
        (engine.load_adapter("v2", tmp_path), "adapter_config.json missing"),
        (engine.load_adapter("v2", other_base_adapter), "was trained on .*, not on the served"),
        (engine.load_adapter("v2", disguised), "where the served base needs"),
        (engine.load_adapter("v1", adapters["v2"]), "already served"),
        (engine.load_adapter("base", adapters["v2"]), "reserved"),
        (engine.load_adapter("V 2", adapters["v2"]), "is not valid"),
        (engine.unload_adapter("v1"), "default adapter"),
        (engine.unload_adapter("finetuned"), "not an adapter's own name"),
    ]
    for refused, needle in refusals:
        with pytest.raises(AdapterRejected, match=needle) as info:
            await refused
        assert "\n" not in str(info.value)
    with pytest.raises(UnknownModel):
        await engine.unload_adapter("v9")
    with pytest.raises(UnknownModel):
        await engine.set_default("v9")
    with pytest.raises(InvalidRequest, match="two different models"):
        await engine.compare(QUESTION, models=("v1", "v1"))
    assert engine.models().names == ("base", "finetuned", "v1")
    assert await alone(engine, ["base", "v1"]) == before, "a refused load changes nothing"


async def test_promotion_repoints_finetuned_and_the_old_default_can_go(
    engine_of: Any, adapters: dict[str, Path]
):
    engine = await engine_of({"v1": adapters["v1"], "v2": adapters["v2"]})
    single = await alone(engine, ["v1", "v2"])
    models = await engine.set_default("v2")
    assert isinstance(models, ServedModels) and models.default == "v2"
    assert key(await engine.generate(QUESTION)) == single["v2"]
    await engine.unload_adapter("v1")
    assert engine.models().names == ("base", "finetuned", "v2")


async def test_a_base_only_server_takes_its_first_adapter_as_the_default(
    engine_of: Any, adapters: dict[str, Path]
):
    engine = await engine_of({})
    assert engine.models().names == ("base",)
    with pytest.raises(UnknownModel, match="no finetuned adapter"):
        await engine.generate(QUESTION)
    await engine.load_adapter("v3", adapters["v3"])
    assert engine.models().default == "v3"
    reference = await alone(await engine_of({"v3": adapters["v3"]}), ["base", "v3"])
    assert await alone(engine, ["base", "v3"]) == reference


async def test_an_adapter_of_another_base_is_refused_at_start_in_one_line(
    tiny_model_dir: Path, other_base_adapter: Path
):
    engine = LocalEngine(settings(tiny_model_dir, {"v1": other_base_adapter}))
    with pytest.raises(UserError, match=r"^adapter v1: the adapter at .* was trained on") as info:
        await engine.start()
    assert "\n" not in str(info.value)


async def test_an_adapter_with_another_chat_template_loads_with_a_warning(
    engine_of: Any, adapters: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    import shutil

    changed = tmp_path / "templated"
    shutil.copytree(adapters["v1"], changed)
    config = changed / "tokenizer_config.json"
    template = changed / "chat_template.jinja"
    if template.is_file():
        template.write_text(template.read_text() + "{# changed #}")
    else:
        values = json.loads(config.read_text())
        values["chat_template"] += "{# changed #}"
        config.write_text(json.dumps(values))
    engine = await engine_of({"v1": adapters["v1"]})
    with caplog.at_level(logging.WARNING):
        await engine.load_adapter("v1b", changed)
    assert any(
        "adapter v1b: its saved chat template differs" in r.getMessage() for r in caplog.records
    )
    assert key(await engine.generate(QUESTION, variant="v1b")) == key(
        await engine.generate(QUESTION, variant="v1")
    ), "prompted with the base's template, the same weights answer the same"


def test_batched_lora_computes_what_peft_does_for_every_row(
    tiny_model_dir: Path, adapters: dict[str, Path]
):
    """The stacked, gathered products give each row its adapter's logits as peft's own
    forward does, ranks, alphas, targets and the lm_head copy all different."""
    import torch

    from bot.serving.batched_lora import BatchedLora
    from finetune.modeling import (
        QuantOptions,
        attach_adapter,
        load_base_model,
        load_tokenizer,
        read_adapter,
    )

    model = load_base_model(tiny_model_dir, quant=QuantOptions(load_in_4bit=True))
    for name, path in adapters.items():
        model = attach_adapter(model, name, read_adapter(path))
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer(["Which skis for park and pipe?"] * 4, return_tensors="pt")["input_ids"]
    names = ["__base__", "v1", "v2", "v3"]
    with torch.inference_mode():
        expected = []
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    expected.append(model(input_ids=ids[row : row + 1]).logits)
            else:
                model.set_adapter(name)
                expected.append(model(input_ids=ids[row : row + 1]).logits)
        batched = BatchedLora.build(model, list(adapters))
        assert batched is not None, "these layouts are covered"
        batched.hold(names, model.device)
        with model.disable_adapter():
            together = model(input_ids=ids).logits
        batched.release()
    assert not torch.equal(expected[0], expected[2]), "the adapters change the logits"
    # Folding the scale into B rounds differently: 3e-4 on logits up to 15 that the
    # adapters move by 5; the base rows are exact.
    torch.testing.assert_close(together, torch.cat(expected), atol=1e-3, rtol=0)
    assert torch.equal(together[0], expected[0][0])


async def test_an_openai_compatible_server_is_asked_by_the_adapters_names():
    """With INFERENCE_BACKEND=openai the names pass through as the server's model names
    (vLLM's --lora-modules v1=… v2=…); loading is that server's, so the engine refuses it."""
    from bot.serving.adapters import parse_adapters
    from bot.serving.engine import RuntimeUpdatesUnsupported
    from bot.serving.openai_engine import OpenAIEngine, RetryPolicy
    from tests.fake_openai import FakeOpenAIServer

    served = {"base-model-id": "base", "v1": "v1", "v2": "v2"}
    async with FakeOpenAIServer(models=served) as server:
        engine = OpenAIEngine(
            EngineSettings(
                backend="openai",
                openai_base_url=server.url,
                base_model_name="base-model-id",
                adapters=parse_adapters("v1=v1,v2=v2"),
                default_adapter="v2",
                **GREEDY,
            ),
            retry=RetryPolicy(attempts=1),
        )
        await engine.start()
        try:
            assert engine.models().names == ("base", "finetuned", "v1", "v2")
            assert engine.models().default == "v2"
            for name, expected in (("v1", "v1"), ("finetuned", "v2"), ("base", "base-model-id")):
                answer = await engine.generate(QUESTION, variant=name)
                assert (answer.variant, server.requests[-1]["model"]) == (name, expected)
            asked = len(server.requests)
            with pytest.raises(UnknownModel):
                await engine.generate(QUESTION, variant="v3")
            assert len(server.requests) == asked, "refused before the server is asked"
            with pytest.raises(RuntimeUpdatesUnsupported, match="load it there"):
                await engine.load_adapter("v3", "runs/v3/adapter")
        finally:
            await engine.close()
