"""How much GPU memory a run will need, worked out from config.json before any weight is loaded.

An 8 GB card leaves little slack, and finding out after minutes of loading
that a run does not fit is the slowest way to learn it. The estimate adds up
what QLoRA training keeps on the GPU:

* frozen base weights: 4-bit NF4 for every decoder linear layer (0.5 byte a
  weight, plus one 8-bit scale per 64 weights and, with double quantization,
  one fp32 scale per 256 of those), embeddings, norms and the LM head in 16 bits;
* LoRA weights, their gradients and the optimizer state (paged 8-bit AdamW
  keeps 2 bytes a parameter, 32-bit AdamW 8);
* activations for one micro-batch of ``per_device_train_batch_size ×
  max_length`` tokens: every layer's saved tensors without checkpointing,
  only each layer's input plus one layer's tensors with it, and the LM head's
  working tile (trl's fused LM head scores at most 4,096 tokens × 32,768
  vocabulary entries at a time instead of materializing all the logits);
* a fixed allowance for the CUDA context and cuBLAS workspace.

It is an estimate (allocator fragmentation and kernels' scratch space are not
modelled), so training only refuses to start when the total exceeds the whole
card: that is the case where it clearly cannot fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config import FinetuneConfig, TrainingArguments
from finetune.errors import UserError

GIB = 1024**3
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
ACTIVATION_BYTES = 2  # bf16 activations
LOGIT_BYTES = 4  # per element of the LM head's tile: the bf16 product and its gradient
LM_HEAD_TILE = (4096, 32768)  # tokens × vocabulary entries trl's fused LM head computes at once
BNB_BLOCK = 64  # bitsandbytes' 4-bit block size
BNB_NESTED_BLOCK = 256  # double quantization: blocks per second-level scale

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a Mistral/Llama-style config.json that memory depends on."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        def get(key: str, default: Any = None) -> Any:
            if isinstance(config, dict):
                return config.get(key, default)
            return getattr(config, key, default)

        try:
            hidden = int(get("hidden_size"))
            heads = int(get("num_attention_heads"))
            return cls(
                hidden_size=hidden,
                intermediate_size=int(get("intermediate_size")),
                num_layers=int(get("num_hidden_layers")),
                num_heads=heads,
                num_kv_heads=int(get("num_key_value_heads") or heads),
                head_dim=int(get("head_dim") or hidden // heads),
                vocab_size=int(get("vocab_size")),
                tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            )
        except (TypeError, ValueError):
            raise UserError(
                "the model's config.json lacks a decoder's sizes (hidden_size, num_hidden_layers, ...): "
                "only Mistral/Llama-style models can be estimated"
            ) from None

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each projection in one decoder layer."""
        h, q, kv, inter = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, inter),
            "up_proj": (h, inter),
            "down_proj": (inter, h),
        }

    @property
    def linear_params(self) -> int:
        return self.num_layers * sum(i * o for i, o in self.linear_shapes().values())

    @property
    def other_params(self) -> int:
        """Embeddings, LM head and norms: the weights bitsandbytes leaves in 16 bits."""
        heads = 1 if self.tie_word_embeddings else 2
        return (
            heads * self.vocab_size * self.hidden_size
            + (2 * self.num_layers + 1) * self.hidden_size
        )


def mistral_7b_shape() -> ModelShape:
    """Mistral-7B's sizes: transformers' MistralConfig defaults are exactly that model."""
    from transformers import MistralConfig

    return ModelShape.from_config(MistralConfig())


def load_shape(model: str) -> ModelShape:
    """Sizes from a local directory, the Hugging Face cache, or Mistral-7B's built-in shape."""
    path = Path(model).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise UserError(f"{path} has no config.json: is it a saved model directory?")
        return ModelShape.from_config(json.loads(config_file.read_text()))
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "config.json")
    if isinstance(cached, str):
        return ModelShape.from_config(json.loads(Path(cached).read_text()))
    if "mistral-7b" in model.lower():
        return mistral_7b_shape()
    raise UserError(
        f"config.json of {model!r} is not in the local Hugging Face cache: download the model "
        "(or just its config.json) first, or pass a local directory"
    )


def lora_modules(config: FinetuneConfig) -> list[str]:
    if config.target_modules == "all-linear":
        return list(DECODER_LINEARS)
    return [name for name in config.lora_target_modules if name in DECODER_LINEARS]


def optimizer_name(config: TrainingArguments, on_cuda: bool) -> str:
    if config.optim != "auto":
        return config.optim
    return "paged_adamw_8bit" if on_cuda else "adamw_torch"


OPTIMIZER_BYTES_PER_PARAM = {
    "paged_adamw_8bit": 2,
    "adamw_8bit": 2,
    "paged_adamw_32bit": 8,
    "adamw_torch": 8,
    "adamw_torch_fused": 8,
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of GPU memory by what holds them."""

    base_weights: int
    lora_params: int  # a count, not bytes
    lora_weights: int
    gradients: int
    optimizer: int
    activations_checkpointed: int
    activations_full: int
    overhead: int = CUDA_CONTEXT_BYTES

    @property
    def fixed(self) -> int:
        return (
            self.base_weights + self.lora_weights + self.gradients + self.optimizer + self.overhead
        )

    def total(self, checkpointing: bool) -> int:
        activations = self.activations_checkpointed if checkpointing else self.activations_full
        return self.fixed + activations


def estimate_memory(shape: ModelShape, config: FinetuneConfig) -> MemoryEstimate:
    """The estimate for training ``shape`` on a GPU with ``config``."""
    if config.load_in_4bit:
        if config.bnb_4bit_use_double_quant:  # 8-bit block scales + their fp32 scales
            per_weight = 0.5 + 1 / BNB_BLOCK + 4 / (BNB_BLOCK * BNB_NESTED_BLOCK)
        else:  # one fp32 scale a block
            per_weight = 0.5 + 4 / BNB_BLOCK
        base = int(shape.linear_params * per_weight) + 2 * shape.other_params
    else:
        base = 2 * (shape.linear_params + shape.other_params)

    shapes = shape.linear_shapes()
    targets = lora_modules(config)
    lora_params = shape.num_layers * sum(config.lora_r * sum(shapes[name]) for name in targets)
    # modules_to_save trains a full copy of each named module
    full_copies = {
        "lm_head": shape.vocab_size * shape.hidden_size,
        "embed_tokens": shape.vocab_size * shape.hidden_size,
    }
    lora_params += sum(full_copies.get(name, 0) for name in config.lora_modules_to_save)
    # trl casts a quantized model's LoRA weights to bf16; peft keeps them fp32 otherwise.
    lora_bytes = 2 if config.load_in_4bit else 4
    optimizer = OPTIMIZER_BYTES_PER_PARAM[optimizer_name(config, on_cuda=True)] * lora_params

    tokens = config.per_device_train_batch_size * config.max_length
    h, kv = shape.hidden_size, shape.num_kv_heads * shape.head_dim
    # Saved for backward per token in one layer: norms, q/k/v (+ rotary copies), attention
    # output, residuals, the MLP's four intermediate-width tensors.
    per_layer = 10 * h + 4 * kv + 4 * shape.intermediate_size
    if config.lora_dropout > 0:  # each adapted layer keeps its own dropped-out input
        per_layer += sum(shapes[name][0] for name in targets)
    per_layer_bytes = ACTIVATION_BYTES * per_layer * tokens
    logits = LOGIT_BYTES * min(tokens, LM_HEAD_TILE[0]) * min(shape.vocab_size, LM_HEAD_TILE[1])
    boundaries = ACTIVATION_BYTES * h * tokens * shape.num_layers

    return MemoryEstimate(
        base_weights=base,
        lora_params=lora_params,
        lora_weights=lora_bytes * lora_params,
        gradients=lora_bytes * lora_params,
        optimizer=optimizer,
        activations_checkpointed=boundaries + per_layer_bytes + logits,
        activations_full=shape.num_layers * per_layer_bytes + logits,
    )


@dataclass(frozen=True)
class GpuInfo:
    name: str
    total: int


def visible_gpu() -> GpuInfo | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return GpuInfo(name=props.name, total=props.total_memory)


def format_estimate(
    shape: ModelShape, config: FinetuneConfig, estimate: MemoryEstimate, gpu: GpuInfo | None
) -> str:
    checkpointing = config.gradient_checkpointing
    quant = f"4-bit {config.bnb_4bit_quant_type.upper()}" if config.load_in_4bit else "16-bit"
    rows = [
        (f"base weights ({quant})", estimate.base_weights),
        (f"LoRA weights ({estimate.lora_params / 1e6:.1f} M parameters)", estimate.lora_weights),
        ("LoRA gradients", estimate.gradients),
        (f"optimizer state ({optimizer_name(config, on_cuda=True)})", estimate.optimizer),
        ("activations, checkpointing on", estimate.activations_checkpointed),
        ("activations, checkpointing off", estimate.activations_full),
        ("CUDA context and workspace", estimate.overhead),
        ("total, checkpointing on", estimate.total(True)),
        ("total, checkpointing off", estimate.total(False)),
    ]
    configured = "total, checkpointing " + ("on" if checkpointing else "off")
    width = max(len(label) for label, _ in rows)
    lines = [
        f"memory estimate for {config.model}: {shape.num_layers} layers, hidden {shape.hidden_size}, "
        f"vocab {shape.vocab_size}; micro-batch {config.per_device_train_batch_size} x "
        f"{config.max_length} tokens; LoRA r={config.lora_r} on {len(lora_modules(config))} "
        "modules a layer"
    ]
    for label, size in rows:
        mark = "  <- this config" if label == configured else ""
        lines.append(f"  {label.ljust(width)}  {size / GIB:6.2f} GiB{mark}")
    needed = estimate.total(checkpointing)
    if gpu is None:
        lines.append("no CUDA GPU visible: training would run on the CPU")
    elif needed <= gpu.total:
        spare = (gpu.total - needed) / GIB
        lines.append(f"{gpu.name} ({gpu.total / GIB:.2f} GiB): fits, {spare:.2f} GiB spare")
    else:
        lines.append(f"{gpu.name} ({gpu.total / GIB:.2f} GiB): does NOT fit")
    return "\n".join(lines)


def estimate_for(config: FinetuneConfig) -> tuple[ModelShape, MemoryEstimate]:
    shape = load_shape(config.model)
    return shape, estimate_memory(shape, config)


def check_fits(
    config: FinetuneConfig, gpu: GpuInfo | None
) -> tuple[ModelShape, FinetuneConfig, MemoryEstimate] | None:
    """Refuse a run that clearly cannot fit the visible GPU (no check on CPU).

    Returns what :func:`format_estimate` prints, when there was something to check.
    """
    if gpu is None or not config.check_memory:
        return None
    shape, estimate = estimate_for(config)
    needed = estimate.total(config.gradient_checkpointing)
    if needed > gpu.total:
        hint = "" if config.gradient_checkpointing else "turn on --gradient-checkpointing, "
        raise UserError(
            f"this run needs about {needed / GIB:.1f} GiB but {gpu.name} has {gpu.total / GIB:.1f} GiB: "
            f"{hint}lower --max-length or --per-device-train-batch-size "
            "(see python -m finetune estimate), or pass --check-memory false to try anyway"
        )
    return shape, config, estimate
