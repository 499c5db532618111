"""`make demo` end to end with the real model, and the product's promise checked on its output.

sample forum → crawl → dataset → get-model (SmolLM2-135M-Instruct, cached in
the checkout's .cache/) → QLoRA → evaluate → three test questions as one
/compare batch. Then: the held-out loss fell, the answers are English, and the
bot's console and API serve the model with the demo's adapter.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bot.demo import MODEL_CACHE, QUESTIONS_SHOWN, STEPS
from tests.loopback import bot_api

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What skis should I get for park and powder?"
pytestmark = pytest.mark.timeout(2700)  # ~6 min on 2 idle cores; far more on a busy machine


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The demo's stdout and its work directory (one run for every test here)."""
    work = tmp_path_factory.mktemp("demo") / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "bot.demo", "--workdir", str(work)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, work


def english_share(texts: list[str]) -> float:
    """The share of words that SmolLM2's tokenizer holds whole: high for English, low for
    the random model's "skis length funen Any pEandlk"."""
    from finetune.modeling import load_tokenizer

    vocab = load_tokenizer(MODEL_CACHE).get_vocab()
    words = [w for text in texts for w in re.findall(r"[A-Za-z]+", text)]
    assert len(words) >= 20, texts
    whole = sum(f"Ġ{w}" in vocab or f"Ġ{w.lower()}" in vocab for w in words)
    return whole / len(words)


def test_the_demo_runs_every_step_and_prints_forum_base_and_finetuned(demo: tuple[str, Path]):
    out, work = demo
    for step in range(1, STEPS + 1):
        assert f"[{step}/{STEPS}]" in out
    assert out.count("Q: ") == QUESTIONS_SHOWN
    for label in ("forum: ", "base: ", "finetuned: "):
        assert out.count(label) == QUESTIONS_SHOWN, label
    assert re.search(r"base loss \d+\.\d+ .*finetuned loss \d+\.\d+", out)
    assert "held-out loss" in out
    run = work / "run"
    for name in (
        "adapter/adapter_config.json",
        "loss.png",
        "samples.md",
        "manifest.json",
        "evaluation.json",
        "evaluation.md",
    ):
        assert (run / name).is_file(), name
    assert "All done" in out


def test_the_finetune_lowers_the_held_out_loss(demo: tuple[str, Path]):
    _, work = demo
    evaluation = json.loads((work / "run" / "evaluation.json").read_text())
    assert evaluation["finetuned_loss"] < evaluation["base_loss"] * 0.97, evaluation["verdict"]
    assert "learned the forum" in evaluation["verdict"]
    manifest = json.loads((work / "run" / "manifest.json").read_text())
    assert manifest["final_eval_loss"] < manifest["base_eval_loss"]


def test_both_models_answer_in_english_and_the_finetune_stops(demo: tuple[str, Path]):
    _, work = demo
    evaluation = json.loads((work / "run" / "evaluation.json").read_text())
    answers = evaluation["test_answers"]
    assert answers
    assert english_share([a["forum"] for a in answers]) > 0.8  # the measure itself
    assert english_share([a["base"] for a in answers]) > 0.8
    assert english_share([a["finetuned"] for a in answers]) > 0.8
    stats = evaluation["test_answer_stats"]
    assert stats["finetuned"]["ended_on_own"] >= 1
    assert stats["finetuned"]["leaked"] == 0


def serving_env(work: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "INFERENCE_BACKEND": "local",
        "BASE_MODEL": str(MODEL_CACHE),
        "ADAPTER_PATH": str(work / "run" / "adapter"),
        "MAX_NEW_TOKENS": "24",
        "TEMPERATURE": "0",
        "API_TOKEN": "",
        "METRICS_PORT": "",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",  # a few answers: one thread never loses to a busy machine
        **extra,
    }


def test_the_console_answers_with_the_adapter(demo: tuple[str, Path], tmp_path: Path):
    _, work = demo
    result = subprocess.run(
        [sys.executable, "-m", "bot", "--console"],
        cwd=tmp_path,  # no .env from the checkout
        env=serving_env(work),
        input=f"/compare {QUESTION}\n/quit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    base = result.stdout.split("--- base ---")[1].split("--- finetuned ---")[0]
    finetuned = result.stdout.split("--- finetuned ---")[1]
    assert english_share([base, finetuned]) > 0.8, result.stdout


def api_answer(url: str, model: str) -> dict[str, Any]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": QUESTION}]})
    request = urllib.request.Request(
        f"{url}/chat/completions", body.encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_the_api_answers_with_the_adapter(demo: tuple[str, Path], tmp_path: Path):
    _, work = demo
    with bot_api(serving_env(work), tmp_path, start_timeout_s=240, stop_timeout_s=60) as api:
        texts = []
        for model in ("base", "finetuned"):
            reply = api_answer(api.url, model)
            assert reply["usage"]["completion_tokens"] > 0
            texts.append(reply["choices"][0]["message"]["content"])
        assert texts[0] != texts[1], "the adapter should change the answer"
        assert english_share(texts) > 0.8, texts
