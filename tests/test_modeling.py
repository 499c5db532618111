"""The shared loader and the tiny Mistral: build, save, load (4-bit too), prompt, generate, adapters."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from finetune.errors import UserError
from finetune.generation import encode_chats
from finetune.modeling import (
    QuantOptions,
    attach_new_adapter,
    load_adapter,
    load_base_model,
    load_tokenizer,
    resolve_model_source,
    save_adapter,
)
from finetune.tiny_model import TinyModelSpec, build_tiny_model

QUESTION = [{"role": "user", "content": "How do I land switch?"}]


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_model_is_small_and_deterministic_per_seed(tiny_model_dir: Path, tmp_path: Path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert _digest(again) == _digest(tiny_model_dir)
    assert _digest(other) != _digest(tiny_model_dir)
    assert (again / "tokenizer.json").read_text() == (tiny_model_dir / "tokenizer.json").read_text()
    assert (tiny_model_dir / "model.safetensors").stat().st_size < 10_000_000
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "mistral"
    assert config["vocab_size"] % 32 == 0


def test_tokenizer_has_mistral_special_tokens_and_template(tiny_model_dir: Path):
    tokenizer = load_tokenizer(tiny_model_dir)
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    text = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
        ],
        tokenize=False,
    )
    assert text == "<s>[INST] Q1 [/INST] A1</s>[INST] Q2 [/INST]"
    with_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}],
        tokenize=False,
    )
    assert with_system == "<s>[INST] Be brief.\n\nQ [/INST]"


def test_chat_template_rejects_non_alternating_roles(tiny_model_dir: Path):
    tokenizer = load_tokenizer(tiny_model_dir)
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False
        )


def test_spec_rejects_sizes_the_4bit_cpu_kernel_cannot_run():
    with pytest.raises(UserError, match="688 is not a multiple of 32"):
        TinyModelSpec(intermediate_size=688).validate()


def test_loads_in_4bit_and_generates(tiny_model_dir: Path):
    import bitsandbytes as bnb

    model = load_base_model(tiny_model_dir)  # 4-bit NF4 by default
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert model.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert model.config.quantization_config.bnb_4bit_use_double_quant is True
    tokenizer = load_tokenizer(tiny_model_dir)
    batch = encode_chats(tokenizer, [QUESTION])
    out = model.generate(
        **batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert out.shape[1] > batch["input_ids"].shape[1]


def test_adapter_attach_save_load_round_trip(tiny_model_dir: Path, tmp_path: Path):
    from peft import LoraConfig

    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_model_dir)
    plain = QuantOptions(load_in_4bit=False)
    model = attach_new_adapter(
        load_base_model(tiny_model_dir, quant=plain),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    model.eval()
    batch = encode_chats(tokenizer, [QUESTION])
    with torch.no_grad():
        trained_logits = model(**batch).logits
    adapter_dir = save_adapter(model, tmp_path / "adapter", tokenizer)
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert (adapter_dir / "chat_template.jinja").is_file()

    reloaded = load_adapter(load_base_model(tiny_model_dir, quant=plain), adapter_dir)
    assert not reloaded.training
    with torch.no_grad():
        reloaded_logits = reloaded(**batch).logits
        with reloaded.disable_adapter():
            base_logits = reloaded(**batch).logits
    torch.testing.assert_close(reloaded_logits, trained_logits)
    assert not torch.allclose(base_logits, trained_logits), "the adapter must change the output"


def test_adapter_loads_onto_a_4bit_base(tiny_model_dir: Path, tiny_adapter_dir: Path):
    model = load_adapter(load_base_model(tiny_model_dir), tiny_adapter_dir)
    assert "finetuned" in model.peft_config


def test_offline_hub_id_not_in_cache_names_where_it_looked(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as info:
        resolve_model_source("mistralai/Mistral-7B-Instruct-v0.2")
    message = str(info.value)
    assert "not in the local Hugging Face cache" in message
    assert str(tmp_path / "hub") in message
    assert "HF_HUB_OFFLINE=1" in message


@pytest.mark.parametrize("name", ["./models/missing", "/no/such/dir", "a/b/c"])
def test_missing_local_path_is_a_clear_error(name: str):
    with pytest.raises(UserError, match="not found: no such directory"):
        resolve_model_source(name)


def test_directory_without_config_is_rejected(tmp_path: Path):
    with pytest.raises(UserError, match=r"has no config\.json"):
        load_base_model(tmp_path)


def test_missing_adapter_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path):
    model = load_base_model(tiny_model_dir, quant=QuantOptions(load_in_4bit=False))
    with pytest.raises(UserError, match="no adapter at"):
        load_adapter(model, tmp_path)


def test_hub_failures_become_one_line(monkeypatch):
    from transformers import AutoTokenizer

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to the Hub to load the files.\nCheck your connection.")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", unreachable)
    with pytest.raises(UserError) as info:
        load_tokenizer("mistralai/Mistral-7B-Instruct-v0.2")
    assert "\n" not in str(info.value)
    assert "couldn't connect" in str(info.value)


def test_a_save_killed_midway_never_leaves_an_adapter_that_loads(tiny_model_dir: Path, tmp_path):
    """A run killed while writing adapter/ (here: while writing the tokenizer, after the
    weights) leaves no adapter/ on a first save, and the previous one whole on a later save."""
    from peft import LoraConfig

    from finetune.fingerprint import adapter_weights_hash

    class Killed(Exception):
        pass

    class DyingTokenizer:
        def save_pretrained(self, path: str) -> None:
            raise Killed

    torch.manual_seed(0)
    model = attach_new_adapter(
        load_base_model(tiny_model_dir, quant=QuantOptions(load_in_4bit=False)),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    out = tmp_path / "run" / "adapter"
    with pytest.raises(Killed):
        save_adapter(model, out, DyingTokenizer())
    assert not (out / "adapter_config.json").exists()

    save_adapter(model, out, load_tokenizer(tiny_model_dir))
    saved = adapter_weights_hash(out)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(1.0)
    with pytest.raises(Killed):
        save_adapter(model, out, DyingTokenizer())
    assert adapter_weights_hash(out) == saved
    assert (out / "tokenizer_config.json").is_file()

    save_adapter(model, out, load_tokenizer(tiny_model_dir))  # the next save cleans up
    assert adapter_weights_hash(out) != saved
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"]
    load_adapter(load_base_model(tiny_model_dir, quant=QuantOptions(load_in_4bit=False)), out)
