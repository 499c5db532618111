"""Shared fixtures: the tiny Mistral model and a LoRA adapter for it, built once per run.

Nothing here touches a network: the Hub is forced offline before any Hugging
Face library is imported.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session", autouse=True)
def feedback_db_outside_the_checkout(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Answers the bot and the API record go to a scratch store, never data/ in the checkout.

    Set in the environment, so ``python -m bot …`` subprocesses inherit it;
    tests of the default itself unset it with monkeypatch.
    """
    if "FEEDBACK_DB" not in os.environ:
        os.environ["FEEDBACK_DB"] = str(tmp_path_factory.mktemp("feedback") / "feedback.sqlite")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly built tiny Mistral (random weights, seed 0) with its tokenizer."""
    from finetune.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random (non-zero) weights, saved with the tokenizer like a run's adapter/.

    Random B matrices make the finetuned variant differ from the base without training.
    """
    from finetune.tiny_model import save_random_adapter

    return save_random_adapter(
        tiny_model_dir,
        tmp_path_factory.mktemp("tiny-adapter"),
        seed=0,
        r=8,
        lora_alpha=16,
        target_modules="all-linear",
    )


# How the three adapters of `tiny_adapters` differ: rank, alpha, what they adapt, and a
# trained lm_head copy (v2), so serving them together covers every mix peft allows.
TINY_ADAPTERS: dict[str, dict[str, Any]] = {
    "v1": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    "v2": {
        "r": 4,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": ["lm_head"],
    },
    "v3": {"r": 16, "lora_alpha": 8, "target_modules": ["gate_proj", "down_proj"]},
}


@pytest.fixture(scope="session")
def tiny_adapters(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Three adapters for the tiny model, made differently (``TINY_ADAPTERS``), by name."""
    from finetune.tiny_model import save_random_adapter

    root = tmp_path_factory.mktemp("tiny-adapters")
    return {
        name: save_random_adapter(tiny_model_dir, root / name, seed=seed, **lora)
        for seed, (name, lora) in enumerate(TINY_ADAPTERS.items(), start=1)
    }


@pytest.fixture(scope="session")
def other_base_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter of another base: a tiny model of another width, which serving must refuse."""
    from finetune.tiny_model import TinyModelSpec, build_tiny_model, save_random_adapter

    other = build_tiny_model(
        tmp_path_factory.mktemp("other-base"), spec=TinyModelSpec(hidden_size=128)
    )
    return save_random_adapter(
        other,
        tmp_path_factory.mktemp("other") / "adapter",
        seed=7,
        r=4,
        target_modules="all-linear",
    )


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct, fetched and converted once into the checkout's .cache/ (as `make demo` does)."""
    from bot.demo import MODEL_CACHE, MODEL_NAME
    from finetune.get_model import get_model

    path, _ = get_model(MODEL_NAME, MODEL_CACHE)
    return path


@pytest.fixture(scope="session")
def forum_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample forum, crawled once on loopback into an indexed store (read-only use)."""
    from tests.forum_store import crawl_sample_forum

    return crawl_sample_forum(tmp_path_factory.mktemp("forum") / "forum.sqlite")
