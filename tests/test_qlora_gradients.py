"""LoRA gradients on a 4-bit base are the gradients of the dequantized model.

bitsandbytes computes a ``Linear4bit`` by dequantizing its weight and
multiplying; on CPUs with AVX512-BF16 an eval-mode pass (every evaluation
during training) would switch it to the ``gemv_4bit`` inference kernel,
which has no backward (torch's "autograd kernel was not registered"
warning), and the frozen weights' share of every gradient would silently go.
These tests hold the training path to a plain float32 reference, before and
after an evaluation pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.modeling import (
    QuantOptions,
    attach_new_adapter,
    keep_4bit_layers_differentiable,
    load_base_model,
    load_tokenizer,
)

pytestmark = pytest.mark.timeout(120)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "dataset" / "train.jsonl"


def lora_config() -> Any:
    from peft import LoraConfig

    # Non-zero B, so the gradients of A are non-zero too and every LoRA weight is compared.
    return LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules="all-linear",
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )


def one_batch(model_dir: Path) -> dict[str, torch.Tensor]:
    tokenizer = load_tokenizer(model_dir)
    rows = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()[:3]]
    texts = [
        tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows
    ]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return dict(batch)


def lora_gradients(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    return {
        name: param.grad.detach().clone()
        for name, param in model.named_parameters()
        if "lora_" in name and param.grad is not None
    }


def dequantized_reference(model_dir: Path, quantized: Any) -> Any:
    """The float32 model whose linear weights are exactly the 4-bit ones, dequantized,
    with the quantized model's LoRA weights."""
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    reference = load_base_model(model_dir, quant=QuantOptions(load_in_4bit=False), device="cpu")
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, module in quantized.base_model.model.named_modules():
            if isinstance(module, Linear4bit):
                weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
                target = modules[name.removesuffix(".base_layer")]
                target.weight.copy_(weight.to(target.weight.dtype))
    reference = attach_new_adapter(reference, lora_config())
    set_peft_model_state_dict(reference, get_peft_model_state_dict(quantized))
    return reference


def assert_same_gradients(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() and len(got) > 0
    for name in want:
        assert got[name].abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(got[name], want[name], rtol=2e-3, atol=1e-6, msg=name)


def test_lora_gradients_on_a_4bit_base_match_the_dequantized_reference(tiny_model_dir: Path):
    torch.manual_seed(0)
    base = load_base_model(tiny_model_dir, quant=QuantOptions(load_in_4bit=True), device="cpu")
    quantized = attach_new_adapter(base, lora_config())
    reference = dequantized_reference(tiny_model_dir, quantized)
    batch = one_batch(tiny_model_dir)
    want = lora_gradients(reference, batch)
    assert_same_gradients(lora_gradients(quantized, batch), want)

    # What Trainer.evaluate does mid-run: eval mode, no gradients. Training afterwards
    # must still take the differentiable path.
    quantized.eval()
    with torch.no_grad():
        quantized(**batch)
    assert_same_gradients(lora_gradients(quantized, batch), want)


def test_training_never_lets_bitsandbytes_switch_to_its_inference_kernel(tiny_model_dir: Path):
    from bitsandbytes.nn import Linear4bit

    base = load_base_model(tiny_model_dir, quant=QuantOptions(load_in_4bit=True), device="cpu")
    layers = [m for m in base.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True  # as on a CPU with AVX512-BF16
    attach_new_adapter(base, lora_config())
    assert layers and not any(layer.support_avx512bf16_for_cpu for layer in layers)
    assert keep_4bit_layers_differentiable(base) == len(layers)
