"""Several adapters behind ``python -m bot api``, driven as a vLLM client drives them.

One real server on loopback serves the tiny model with three adapters made
differently (tests/test_adapters.py makes them) and runtime updates on. The
official ``openai`` client lists and asks the models; the LoRA routes, which
the client has no method for, are raw POSTs as vLLM's users send them. Every
answer is greedy, so "answers as it does alone" is an equality of texts.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from bot.api.routes import create_app
from bot.api.settings import ApiSettings
from bot.feedback.store import FeedbackStore
from finetune.fingerprint import adapter_weights_hash
from tests.loopback import ApiProcess, bot_api, serve_app
from tests.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.timeout(300)

TOKEN = "adapter-api-token"
QUESTION = [{"role": "user", "content": "Which skis for park and pipe?"}]
TOKENS = 12


@pytest.fixture(scope="module")
def adapters(tiny_adapters: dict[str, Path]) -> dict[str, Path]:
    return tiny_adapters


@pytest.fixture(scope="module")
def cwd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's working directory; its feedback store is there."""
    return tmp_path_factory.mktemp("adapter-api")


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, adapters: dict[str, Path], cwd: Path) -> Iterator[ApiProcess]:
    """The three adapters, v2 the default, runtime updates on, answers recorded."""
    env = {
        "INFERENCE_BACKEND": "local",
        "BASE_MODEL": str(tiny_model_dir),
        "ADAPTER_PATH": None,
        "ADAPTERS": ",".join(f"{name}={path}" for name, path in adapters.items()),
        "DEFAULT_ADAPTER": "v2",
        "RUNTIME_ADAPTER_UPDATES": "true",
        "API_TOKEN": TOKEN,
        "MAX_NEW_TOKENS": "64",
        "MAX_BATCH": "8",
        "FEEDBACK_DB": str(cwd / "feedback.sqlite"),
        "LOG_LEVEL": "INFO",
    }
    with bot_api(env, cwd, start_timeout_s=120) as api:
        yield api


@pytest.fixture(scope="module")
def client(server: ApiProcess) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.url, api_key=TOKEN, max_retries=0, timeout=60) as official:
        yield official


def ask(client: OpenAI, model: str, max_tokens: int = TOKENS) -> str:
    answer = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=max_tokens, temperature=0
    )
    assert answer.model == model
    return answer.choices[0].message.content or ""


def post(server: ApiProcess, route: str, body: Any, token: str = TOKEN) -> tuple[int, Any]:
    """A raw POST to one of the LoRA routes, as vLLM's users send them; (status, JSON body)."""
    request = urllib.request.Request(
        f"{server.url}/{route}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def alone(client: OpenAI) -> dict[str, str]:
    """Each model's answer asked on its own."""
    return {model: ask(client, model) for model in ("base", "finetuned", "v1", "v2", "v3")}


def model_ids(client: OpenAI) -> list[str]:
    """The served names (the base model's own id, listed last, left out)."""
    return [
        model.id
        for model in client.models.list()
        if model.model_extra["root"] != "base" or model.id == "base"
    ]


def test_models_lists_base_finetuned_and_every_adapter(client: OpenAI) -> None:
    models = {model.id: model for model in client.models.list()}
    assert list(models)[:5] == ["base", "finetuned", "v1", "v2", "v3"]
    # and the base model's own id, as vLLM lists it
    assert [m.model_extra for m in list(models.values())[5:]] == [{"root": "base", "parent": None}]
    assert models["finetuned"].model_extra == {"root": "v2", "parent": "base"}
    assert models["v1"].model_extra == {"root": "v1", "parent": "base"}


def test_each_adapter_answers_as_alone_also_when_all_are_asked_at_once(
    server: ApiProcess, alone: dict[str, str]
) -> None:
    assert alone["finetuned"] == alone["v2"], "finetuned is the default adapter, v2"
    assert len({alone[m] for m in ("base", "v1", "v2", "v3")}) == 4, "four different models"

    async def together() -> dict[str, str]:
        async with AsyncOpenAI(base_url=server.url, api_key=TOKEN, max_retries=0) as client:
            models = ["base", "finetuned", "v1", "v2", "v3"]
            answers = await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=m, messages=QUESTION, max_tokens=TOKENS, temperature=0
                    )
                    for m in models
                )
            )
        return {m: a.choices[0].message.content or "" for m, a in zip(models, answers, strict=True)}

    assert asyncio.run(together()) == alone


def test_an_unknown_model_is_404_model_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        ask(client, "v9")
    assert info.value.code == "model_not_found"
    assert "v9" in info.value.message


def test_an_adapter_loaded_mid_stream_answers_as_at_start_and_the_stream_goes_on(
    server: ApiProcess, client: OpenAI, adapters: dict[str, Path], alone: dict[str, str]
) -> None:
    long_base = ask(client, "base", max_tokens=64)
    pieces: list[str] = []
    with client.chat.completions.create(
        model="base", messages=QUESTION, max_tokens=64, temperature=0, stream=True
    ) as stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                if len(pieces) == 1:  # the stream is running: load v3's weights as "late"
                    status, body = post(
                        server,
                        "load_lora_adapter",
                        {"lora_name": "late", "lora_path": str(adapters["v3"])},
                    )
                    assert status == 200, body
    assert "".join(pieces) == long_base, "the running answer is not changed by the load"
    assert [a["lora_name"] for a in body["data"]] == ["v1", "v2", "v3", "late"]
    assert body["data"][-1]["weights_hash"] == adapter_weights_hash(adapters["v3"])
    assert "late" in model_ids(client)
    assert ask(client, "late") == alone["v3"], "loaded at runtime, it answers as at start"
    assert {m: ask(client, m) for m in alone} == alone, "no other model's answers moved"

    status, body = post(server, "unload_lora_adapter", {"lora_name": "late"})
    assert status == 200 and "late" not in [a["lora_name"] for a in body["data"]]
    assert "late" not in model_ids(client)
    with pytest.raises(openai.NotFoundError):
        ask(client, "late")
    status, body = post(server, "unload_lora_adapter", {"lora_name": "late"})
    assert (status, body["error"]["code"]) == (404, "model_not_found")


def test_bad_loads_and_unloads_are_a_400_saying_why(
    server: ApiProcess,
    client: OpenAI,
    adapters: dict[str, Path],
    other_base_adapter: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    not_an_adapter = tmp_path_factory.mktemp("empty")
    foreign = other_base_adapter
    refusals = [
        ("load_lora_adapter", {"lora_name": "x", "lora_path": str(not_an_adapter)}, "missing"),
        ("load_lora_adapter", {"lora_name": "x", "lora_path": str(foreign)}, "trained on"),
        ("load_lora_adapter", {"lora_name": "v1", "lora_path": str(adapters["v3"])}, "already"),
        ("load_lora_adapter", {"lora_name": "base", "lora_path": str(adapters["v3"])}, "reserved"),
        ("load_lora_adapter", {"lora_name": "V 2", "lora_path": str(adapters["v3"])}, "valid"),
        ("load_lora_adapter", {"lora_name": "x"}, "lora_path"),
        ("unload_lora_adapter", {"lora_name": "v2"}, "default"),
        ("unload_lora_adapter", {"lora_name": "finetuned"}, "not an adapter's own name"),
    ]
    for route, body, needle in refusals:
        status, answer = post(server, route, body)
        assert status == 400, (route, body, answer)
        assert needle in answer["error"]["message"] and "\n" not in answer["error"]["message"]
    status, answer = post(server, "load_lora_adapter", {"lora_name": "x"}, token="wrong")
    assert (status, answer["error"]["code"]) == (401, "invalid_api_key")
    assert model_ids(client) == ["base", "finetuned", "v1", "v2", "v3"], "nothing changed"


def test_promoting_an_adapter_repoints_finetuned(
    server: ApiProcess, client: OpenAI, alone: dict[str, str]
) -> None:
    status, body = post(server, "set_default_adapter", {"lora_name": "v1"})
    assert status == 200 and body["default"] == "v1"
    assert [a["lora_name"] for a in body["data"] if a["default"]] == ["v1"]
    try:
        assert ask(client, "finetuned") == alone["v1"]
        status, body = post(server, "unload_lora_adapter", {"lora_name": "v1"})
        assert status == 400, "v1 is the default now"
        status, body = post(server, "set_default_adapter", {"lora_name": "v9"})
        assert (status, body["error"]["code"]) == (404, "model_not_found")
    finally:
        assert post(server, "set_default_adapter", {"lora_name": "v2"})[0] == 200
    assert ask(client, "finetuned") == alone["v2"]


def test_answers_are_recorded_under_the_adapter_that_wrote_them(
    server: ApiProcess, client: OpenAI, adapters: dict[str, Path], cwd: Path
) -> None:
    ids = {
        model: client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=4, temperature=0
        ).id
        for model in ("finetuned", "v1", "base")
    }
    for answer_id in ids.values():  # a vote lands after its answer's record, on one thread
        assert post(server, "feedback", {"answer_id": answer_id, "rating": "up"})[0] == 200
    with FeedbackStore(cwd / "feedback.sqlite") as store:
        recorded = {model: store.get_answer(answer_id) for model, answer_id in ids.items()}
    assert recorded["finetuned"].variant == "v2", "the alias is recorded as what it stood for"
    assert recorded["finetuned"].adapter.hash == adapter_weights_hash(adapters["v2"])
    assert recorded["v1"].variant == "v1"
    assert recorded["v1"].adapter.hash == adapter_weights_hash(adapters["v1"])
    assert recorded["base"].variant == "base"


# ---- the routes' switch, in this process ------------------------------------------------


@pytest.mark.parametrize(
    "route", ["load_lora_adapter", "unload_lora_adapter", "set_default_adapter"]
)
async def test_without_runtime_updates_the_routes_are_404_saying_how_to_turn_them_on(
    route: str,
) -> None:
    import aiohttp

    async with (
        serve_app(create_app(ScriptedEngine(), ApiSettings())) as url,
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/{route}", json={"lora_name": "v2"}) as response,
    ):
        body = await response.json()
    assert response.status == 404
    assert body["error"]["code"] == "runtime_adapter_updates_off"
    assert "RUNTIME_ADAPTER_UPDATES=true" in body["error"]["message"]


async def test_an_engine_that_cannot_change_its_adapters_says_so_in_a_400() -> None:
    import aiohttp

    settings = ApiSettings(token=TOKEN, runtime_adapter_updates=True)
    async with (
        serve_app(create_app(ScriptedEngine(), settings)) as url,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session,
    ):
        body = {"lora_name": "v2", "lora_path": "runs/v2/adapter"}
        async with session.post(f"{url}/v1/load_lora_adapter", json=body) as response:
            answer = await response.json()
    assert response.status == 400
    assert "scripted" in answer["error"]["message"]


def test_a_pair_vote_on_two_adapters_shows_in_their_results_against_base(
    server: ApiProcess, client: OpenAI
) -> None:
    def answer_id(model: str) -> str:
        return client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=4, temperature=0
        ).id

    base, v1 = answer_id("base"), answer_id("v1")
    status, body = post(server, "feedback", {"a_answer_id": base, "b_answer_id": v1, "choice": "b"})
    assert status == 200, body
    assert body["models"] == {"a": "base", "b": "v1"}
    assert body["counts"] == {"a": 0, "b": 1, "tie": 0, "both_bad": 0}

    request = urllib.request.Request(
        f"{server.url}/adapters", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        listed = {card["lora_name"]: card for card in json.loads(response.read())["data"]}
    assert listed["v1"]["vs_base"]["wins"] == 1 and listed["v1"]["vs_base"]["win_rate"] == 1.0
    low, high = listed["v1"]["vs_base"]["interval_95"]
    assert 0 < low < high == 1.0
    assert "vs_base" not in listed["v3"], "no votes yet"
    assert [n for n, card in listed.items() if card["default"]] == ["v2"]


async def test_a_bot_on_the_openai_backend_asks_this_api_for_adapters_by_name() -> None:
    """INFERENCE_BACKEND=openai with ADAPTERS: the names go through as the server's model names."""
    from bot.serving.adapters import parse_adapters
    from bot.serving.openai_engine import OpenAIEngine
    from bot.serving.settings import EngineSettings
    from tests.scripted_adapters import ScriptedAdapters

    served = ScriptedAdapters(["v1", "v2"], "v2")
    await served.start()
    async with serve_app(create_app(served, ApiSettings())) as url:
        settings = EngineSettings(
            backend="openai",
            openai_base_url=f"{url}/v1",
            adapters=parse_adapters("v1=runs/v1/adapter,v2=runs/v2/adapter"),
            default_adapter="v2",
            temperature=0.0,
        )
        bot = OpenAIEngine(settings)
        await bot.start()
        try:
            assert bot.models().names == ("base", "finetuned", "v1", "v2")
            a, b = await bot.compare(QUESTION, models=("v1", "finetuned"))
        finally:
            await bot.close()
    assert (a.text.split()[0], b.text.split()[0]) == ("v1:", "v2:")
    assert sorted(variant for variant, *_ in served.requests) == ["v1", "v2"]
