"""The run's base model as llama.cpp sees it: hyperparameters, tensor names, row order.

Reads the unquantized safetensors one tensor at a time (a 7B model never sits
in memory whole) and owns the two facts of llama.cpp's llama layout that an
export must get right for base, adapter and merge alike:

* tensor names come from ``gguf.get_tensor_name_map`` (``model.layers.3.self_attn.q_proj``
  becomes ``blk.3.attn_q``);
* Hugging Face orders each Q and K head's rows as two halves (``rotate_half``)
  while llama.cpp's rope rotates adjacent pairs, so Q and K rows are permuted
  per head. Anything that adds to those rows (a LoRA ``B``, a merged update)
  needs the same permutation, or the file loads and answers wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import UserError

if TYPE_CHECKING:
    import numpy as np

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")


def locate_model_dir(name_or_path: str) -> Path:
    """The local directory holding the model's safetensors: a path, or the hub cache's snapshot."""
    from finetune.modeling import resolve_model_source

    source = resolve_model_source(name_or_path)
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                source, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
            )
        )
    except Exception as exc:  # the hub's errors differ by version; all mean "not available"
        raise UserError(
            f"could not get the safetensors of {source!r}: {str(exc).splitlines()[0]} "
            "(download the model first, or point the run's model at a local directory)"
        ) from exc


@dataclass
class BaseModel:
    """A llama-architecture checkpoint on disk, read lazily."""

    directory: Path
    config: dict[str, Any]  # config.json
    tensor_files: dict[str, Path] = field(repr=False)

    @property
    def n_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def n_head(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def n_kv_head(self) -> int:
        return int(self.config.get("num_key_value_heads") or self.n_head)

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.hidden_size // self.n_head)

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def tied(self) -> bool:
        """Tied embeddings: llama.cpp reuses ``token_embd`` when a file has no ``output``."""
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def rope_theta(self) -> float:
        rope = self.config.get("rope_parameters") or {}
        return float(rope.get("rope_theta", self.config.get("rope_theta", 10000.0)))

    def weight_names(self) -> list[str]:
        """The tensors the GGUF carries, in checkpoint order (a tied ``lm_head`` is left out)."""
        names = [n for n in self.tensor_files if not n.endswith("rotary_emb.inv_freq")]
        if self.tied:
            names = [n for n in names if n != "lm_head.weight"]
        return names

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(self.tensor_files[name], framework="pt") as handle:
            return tuple(handle.get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        """One tensor in float32, whatever the checkpoint stores (bf16 included)."""
        import torch
        from safetensors import safe_open

        with safe_open(self.tensor_files[name], framework="pt") as handle:
            tensor: np.ndarray = handle.get_tensor(name).to(torch.float32).numpy()
            return tensor

    def gguf_name(self, hf_name: str) -> str:
        """llama.cpp's name for a checkpoint tensor (``model.norm.weight`` → ``output_norm.weight``)."""
        import gguf

        mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, self.n_layers)
        name = mapping.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(
                f"tensor {hf_name!r} of {self.directory} has no llama.cpp name: "
                "is this a plain llama-architecture checkpoint?"
            )
        return name

    def heads_of(self, hf_name: str) -> int | None:
        """How many heads a tensor's rows are grouped in, for Q and K; None for the rest."""
        if ".q_proj." in hf_name or hf_name.endswith(".q_proj"):
            return self.n_head
        if ".k_proj." in hf_name or hf_name.endswith(".k_proj"):
            return self.n_kv_head
        return None

    def to_llama_rows(self, hf_name: str, rows: np.ndarray) -> np.ndarray:
        """Reorder Q/K rows (a weight, bias or LoRA ``B``) from HF's halves to llama.cpp's pairs."""
        heads = self.heads_of(hf_name)
        return rows if heads is None else permute_heads(rows, heads)


def permute_heads(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Within each head, interleave the first and second half of its rows.

    Row ``h*d + i`` of a head with ``d`` rows goes to ``h*d + 2i`` for the first
    half and ``h*d + 2(i - d/2) + 1`` for the second: the layout in which
    llama.cpp's rope rotates neighbours (0,1), (2,3)… where HF rotates (i, i+d/2).
    """
    per_head = rows.shape[0] // n_heads
    if per_head * n_heads != rows.shape[0] or per_head % 2:
        raise UserError(f"{rows.shape[0]} rows cannot split into {n_heads} heads of even size")
    grouped = rows.reshape(n_heads, 2, per_head // 2, *rows.shape[1:])
    reordered: np.ndarray = grouped.swapaxes(1, 2).reshape(rows.shape)
    return reordered


def _tensor_index(directory: Path) -> dict[str, Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise UserError(
            f"{directory} has no model.safetensors: export reads the unquantized safetensors "
            "checkpoint (convert .bin weights with save_pretrained first)"
        )
    from safetensors import safe_open

    with safe_open(single, framework="pt") as handle:
        return {name: single for name in handle.keys()}  # noqa: SIM118 - safe_open is no dict


def open_base(name_or_path: str) -> BaseModel:
    """The run's base model, or one line saying why llama.cpp's llama graph cannot take it."""
    directory = locate_model_dir(name_or_path)
    config = json.loads((directory / "config.json").read_text())
    architecture = (config.get("architectures") or ["unknown"])[0]
    if (
        architecture not in SUPPORTED_ARCHITECTURES
        or config.get("model_type") not in SUPPORTED_MODEL_TYPES
    ):
        raise UserError(
            f"export supports llama-architecture models (Llama, Mistral, SmolLM2); "
            f"{name_or_path} is {architecture}"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise UserError(
            f"{name_or_path} uses {rope_type!r} rope scaling, which this export does not write yet "
            "(Llama 3.0, Mistral and SmolLM2 use none)"
        )
    return BaseModel(directory, config, _tensor_index(directory))
