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
    import torch
    from peft import LoraConfig

    from finetune.modeling import (
        QuantOptions,
        attach_new_adapter,
        load_base_model,
        load_tokenizer,
        save_adapter,
    )

    torch.manual_seed(0)
    model = load_base_model(tiny_model_dir, quant=QuantOptions(load_in_4bit=False))
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules="all-linear",
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = attach_new_adapter(model, config)
    with torch.no_grad():  # make the adapter's effect clearly visible in greedy output
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(20.0)
    return save_adapter(
        peft_model, tmp_path_factory.mktemp("tiny-adapter"), load_tokenizer(tiny_model_dir)
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
