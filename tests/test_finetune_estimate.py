"""The GPU memory estimate: right magnitude for Mistral-7B, exact where it can be checked."""

from pathlib import Path

import pytest

from finetune.__main__ import main
from finetune.config import FinetuneConfig, parse_config
from finetune.errors import UserError
from finetune.estimate import (
    GIB,
    GpuInfo,
    ModelShape,
    check_fits,
    estimate_memory,
    load_shape,
    mistral_7b_shape,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config_8gb(**overrides) -> FinetuneConfig:
    config = parse_config(["--config", str(CONFIGS / "mistral-7b-8gb.yaml")])
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_mistral_7b_in_4bit_weighs_about_4_gb():
    estimate = estimate_memory(mistral_7b_shape(), config_8gb())
    assert 3.9e9 <= estimate.base_weights <= 4.3e9
    sixteen_bit = estimate_memory(mistral_7b_shape(), config_8gb(load_in_4bit=False))
    assert 14.0e9 <= sixteen_bit.base_weights <= 14.8e9  # 7.24 B parameters × 2 bytes


def test_8gb_config_fits_8gb_only_with_checkpointing():
    estimate = estimate_memory(mistral_7b_shape(), config_8gb())
    assert estimate.total(checkpointing=True) < 8 * GIB < estimate.total(checkpointing=False)
    longer = estimate_memory(mistral_7b_shape(), config_8gb(max_length=2048))
    assert longer.activations_checkpointed > estimate.activations_checkpointed


@pytest.mark.parametrize("modules_to_save", [[], ["lm_head"]])
def test_lora_parameter_count_matches_peft(tiny_model_dir: Path, modules_to_save: list[str]):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.train import lora_config

    config = FinetuneConfig(
        model=str(tiny_model_dir), lora_r=4, lora_modules_to_save=modules_to_save
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainable, _ = get_peft_model(model, lora_config(config)).get_nb_trainable_parameters()
    assert estimate_memory(load_shape(str(tiny_model_dir)), config).lora_params == trainable


def test_4bit_weights_match_the_loaded_model(tiny_model_dir: Path):
    from finetune.modeling import load_base_model

    model = load_base_model(tiny_model_dir, device="cpu")
    estimate = estimate_memory(load_shape(str(tiny_model_dir)), FinetuneConfig())
    # fp32 compute dtype on CPU: the 16-bit parts are twice the estimate's size there
    shape = load_shape(str(tiny_model_dir))
    expected = estimate.base_weights + 2 * shape.other_params
    assert model.get_memory_footprint() == pytest.approx(expected, rel=0.05)


def test_shape_from_a_config_dict_fills_defaults():
    shape = ModelShape.from_config(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 100,
        }
    )
    assert (shape.num_kv_heads, shape.head_dim) == (4, 16)
    with pytest.raises(UserError, match="Mistral/Llama-style"):
        ModelShape.from_config({"hidden_size": 64})


def test_training_refuses_a_gpu_it_clearly_does_not_fit():
    with pytest.raises(UserError, match=r"needs about .* GiB but Small GPU has 4\.0 GiB"):
        check_fits(config_8gb(), GpuInfo("Small GPU", 4 * GIB))
    assert check_fits(config_8gb(), GpuInfo("RTX 3070", 8 * GIB)) is not None
    assert check_fits(config_8gb(), None) is None  # CPU: nothing to check
    assert check_fits(config_8gb(check_memory=False), GpuInfo("Small GPU", 4 * GIB)) is None


def test_unknown_hub_model_without_cache_is_a_user_error():
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        load_shape("someone/unknown-model")


def test_estimate_command_prints_the_breakdown(capsys: pytest.CaptureFixture[str]):
    assert main(["estimate", "--config", str(CONFIGS / "mistral-7b-8gb.yaml")]) == 0
    out = capsys.readouterr().out
    assert "base weights (4-bit NF4)" in out
    assert "activations, checkpointing on" in out
    assert "<- this config" in out
