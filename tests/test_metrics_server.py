"""METRICS_PORT: the Prometheus exposition, scraped over loopback while the engine answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from bot.api.routes import create_app
from bot.api.settings import ApiSettings
from bot.serving import metrics
from bot.serving.engine import EngineBusy, Message
from bot.serving.metrics import CountedEngine
from bot.serving.metrics_server import start_metrics_server
from bot.serving.openai_engine import OpenAIEngine, RetryPolicy
from bot.serving.settings import EngineSettings, metrics_host_from_env
from freeski_common.errors import UserError
from tests.loopback import serve_app
from tests.scripted_engine import ScriptedEngine

pytestmark = pytest.mark.timeout(30)

QUESTION: list[Message] = [{"role": "user", "content": "best boots for wide feet"}]


async def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample on ``/metrics``, keyed by name and labels."""
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_counters_move_as_the_engine_answers() -> None:
    server = start_metrics_server(0, host="127.0.0.1")
    scripted = ScriptedEngine()
    await scripted.start()
    try:
        async with serve_app(create_app(scripted, ApiSettings())) as url:
            engine = CountedEngine(
                OpenAIEngine(
                    EngineSettings(backend="openai", openai_base_url=f"{url}/v1"),
                    retry=RetryPolicy(attempts=1),
                )
            )
            await engine.start()
            try:
                before = await scrape(server.port)
                base, finetuned = await engine.compare(QUESTION)
                scripted.failures = [EngineBusy(retry_after_s=1)]
                with pytest.raises(EngineBusy):
                    await engine.generate(QUESTION)
                after = await scrape(server.port)
            finally:
                await engine.close()
    finally:
        server.close()
        await scripted.close()

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("freeski_answers_total", variant="base", outcome=base.finish_reason) == 1
    assert moved("freeski_answers_total", variant="finetuned", outcome="busy") == 1
    assert (
        moved("freeski_generated_tokens_total", variant="finetuned") == finetuned.completion_tokens
    )
    assert moved("freeski_errors_total", kind="http_429") == 1
    assert moved("freeski_time_to_first_token_seconds_count") == 2
    assert sample(after, "freeski_queue_depth") == 0
    assert sample(after, "freeski_tokens_per_second") > 0
    assert ("freeski_gpu_memory_allocated_bytes", frozenset()) in after


def test_a_port_in_use_is_one_clear_error() -> None:
    server = start_metrics_server(0, host="127.0.0.1")
    try:
        with pytest.raises(UserError, match=f"METRICS_PORT={server.port}"):
            start_metrics_server(server.port, host="127.0.0.1")
    finally:
        server.close()


def test_the_grafana_dashboard_charts_every_metric_and_only_those() -> None:
    dashboard = json.loads((Path(__file__).parents[1] / "docs/grafana-dashboard.json").read_text())
    charted = {
        re.sub(r"_(bucket|sum|count|total)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"freeski_\w+", target["expr"])
    }
    defined = {
        metric.describe()[0].name
        for metric in vars(metrics).values()
        if isinstance(metric, MetricWrapperBase)
    }
    assert charted == defined


def test_metrics_listen_on_loopback_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METRICS_HOST", raising=False)
    assert metrics_host_from_env() == "127.0.0.1"
    server = start_metrics_server(0)
    try:
        assert server.httpd.server_address[0] == "127.0.0.1"
    finally:
        server.close()
    monkeypatch.setenv("METRICS_HOST", "0.0.0.0")
    assert metrics_host_from_env() == "0.0.0.0"
