"""A run's PEFT LoRA adapter, read and checked for what llama.cpp's LoRA format can carry.

llama.cpp applies ``W x + s · B (A x)`` with one ``s = alpha / rank`` per
tensor, ``alpha`` from the file's ``adapter.lora.alpha`` and ``rank`` from each
``B``'s width. PEFT's scale can differ per module (``rank_pattern``,
``alpha_pattern``) and is ``alpha / sqrt(rank)`` under rsLoRA, so each ``B``
is scaled here by PEFT's scale over llama.cpp's, which makes both agree for
every module with one file-wide alpha. What the format has no place for (a
trained full copy of a module, DoRA's magnitudes, LoRA on the embeddings, LoRA
biases) is refused in one line rather than silently dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import UserError

if TYPE_CHECKING:
    import numpy as np

_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraPair:
    """One adapted module in Hugging Face layout: ``ΔW = scaling · b @ a``."""

    module: str  # checkpoint name without ".weight", e.g. model.layers.0.self_attn.q_proj
    a: np.ndarray  # (rank, in)
    b: np.ndarray  # (out, rank)
    scaling: float  # PEFT's: alpha / rank, or alpha / sqrt(rank) with rsLoRA

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self) -> np.ndarray:
        product: np.ndarray = self.b @ self.a
        return self.scaling * product


@dataclass(frozen=True)
class Adapter:
    pairs: list[LoraPair]
    alpha: float  # the file-wide alpha llama.cpp will read

    def b_for_llama_cpp(self, pair: LoraPair) -> np.ndarray:
        """``B`` scaled so that llama.cpp's ``alpha / rank`` reproduces PEFT's scaling."""
        return pair.b * (pair.scaling * pair.rank / self.alpha)


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """PEFT's own rule: a pattern key matches a module name ending in it (after a dot)."""
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), module)
    return float(patterns.get(key, default))


def read_adapter(adapter_dir: Path) -> Adapter:
    config_file = adapter_dir / "adapter_config.json"
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise UserError(
            f"{adapter_dir.parent} has no trained adapter ({adapter_dir.name}/adapter_config.json "
            "and adapter_model.safetensors): export needs a finished run"
        )
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(
            f"the adapter is {config['peft_type']}, not LoRA: llama.cpp takes LoRA only"
        )
    if config.get("use_dora"):
        raise UserError(
            "the adapter uses DoRA, which llama.cpp's LoRA format cannot carry: "
            "train with use_dora off, or merge it (python -m finetune merge) and convert that"
        )
    if config.get("modules_to_save"):
        names = ", ".join(config["modules_to_save"])
        raise UserError(
            f"the adapter trains a full copy of {names} (lora_modules_to_save), which llama.cpp's "
            "LoRA format cannot carry: train without lora_modules_to_save, or merge the run "
            "(python -m finetune merge) and convert the merged model"
        )
    if config.get("lora_bias"):
        raise UserError(
            "the adapter trains LoRA biases, which llama.cpp's LoRA format cannot carry"
        )

    import torch
    from safetensors import safe_open

    tensors: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(weights_file, framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open is no dict
            name = key.removeprefix(_PREFIX)
            if "lora_embedding" in name or "embed_tokens" in name:
                raise UserError(
                    "the adapter trains the token embeddings, which this export cannot carry "
                    "to llama.cpp: train without embed_tokens in lora_target_modules"
                )
            if "lora_magnitude_vector" in name:
                raise UserError("the adapter uses DoRA, which llama.cpp's LoRA format cannot carry")
            if ".lora_A." in name:
                module, part = name.split(".lora_A.")[0], "a"
            elif ".lora_B." in name:
                module, part = name.split(".lora_B.")[0], "b"
            else:
                raise UserError(
                    f"the adapter holds {key!r}, which is not a LoRA A/B matrix: "
                    "llama.cpp's LoRA format cannot carry it"
                )
            tensors.setdefault(module, {})[part] = handle.get_tensor(key).to(torch.float32).numpy()

    rank_default = float(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", rank_default))
    rslora = bool(config.get("use_rslora"))
    pairs = []
    for module, parts in tensors.items():
        if set(parts) != {"a", "b"}:
            raise UserError(f"the adapter's {module} lacks its LoRA A or B matrix: is it complete?")
        rank = parts["a"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha_default)
        scaling = alpha / (math.sqrt(rank) if rslora else rank)
        pairs.append(LoraPair(module, parts["a"], parts["b"], scaling))
    if not pairs:
        raise UserError(f"the adapter in {adapter_dir} holds no LoRA weights")
    # Any positive alpha works once B carries the rest; the config's keeps B as trained
    # for a plain adapter. llama.cpp reads alpha 0 as "scale 1", so never write 0.
    file_alpha = alpha_default if alpha_default > 0 else float(pairs[0].rank)
    return Adapter(pairs, file_alpha)
