"""Export a training run: ``base.gguf``, ``adapter.gguf``, optionally ``merged.gguf``, a Modelfile.

Everything that can be refused is checked before the first byte is written:
the run and its adapter, the base's architecture, that every adapted module
exists in the base (a tied ``lm_head`` does not, in llama.cpp). Then the base
is streamed from its safetensors; the adapter and the merge reuse the same
name map and Q/K row order (:mod:`finetune.export.hf`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import UserError
from finetune.export.adapter import Adapter, LoraPair, read_adapter
from finetune.export.hf import BaseModel, open_base
from finetune.export.writer import DTYPES, PlannedTensor, weight_kind, write_gguf

if TYPE_CHECKING:
    import gguf
    import numpy as np
    from transformers import PreTrainedTokenizerBase

BASE_FILE = "base.gguf"
ADAPTER_FILE = "adapter.gguf"
MERGED_FILE = "merged.gguf"
MODELFILE = "Modelfile"
README = "README.md"


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, int] = field(default_factory=dict)  # name -> bytes
    seconds: float = 0.0

    def summary(self) -> str:
        sizes = ", ".join(f"{name} {size / 2**20:,.1f} MiB" for name, size in self.files.items())
        return f"exported to {self.out_dir} in {self.seconds:.1f} s: {sizes}"


def _file_type(dtype: str) -> int:
    import gguf

    return int(gguf.LlamaFileType.MOSTLY_Q8_0 if dtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)


def _model_metadata(
    base: BaseModel, tokenizer: PreTrainedTokenizerBase, tokenizer_dir: Path, dtype: str, name: str
) -> Callable[[gguf.GGUFWriter], None]:
    def setup(writer: gguf.GGUFWriter) -> None:
        import gguf

        from finetune.export.vocab import write_tokenizer

        config = base.config
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_vocab_size(base.vocab_size)
        writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
        writer.add_embedding_length(base.hidden_size)
        writer.add_block_count(base.n_layers)
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(base.n_head)
        writer.add_head_count_kv(base.n_kv_head)
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_rope_freq_base(base.rope_theta)
        writer.add_rope_dimension_count(base.head_dim)
        if base.head_dim * base.n_head != base.hidden_size:
            writer.add_key_length(base.head_dim)
            writer.add_value_length(base.head_dim)
        writer.add_file_type(_file_type(dtype))
        if dtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(writer, tokenizer, tokenizer_dir, base.vocab_size)

    return setup


def _adapter_metadata(adapter: Adapter, name: str) -> Callable[[gguf.GGUFWriter], None]:
    def setup(writer: gguf.GGUFWriter) -> None:
        import gguf

        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        # float32 exactly: llama.cpp aborts on another type and reads a missing one as scale 1
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.alpha))

    return setup


def base_tensors(base: BaseModel, dtype: str, pairs: dict[str, LoraPair]) -> list[PlannedTensor]:
    """The model's tensors; with ``pairs``, each adapted weight has its update folded in."""
    planned = []
    for name in base.weight_names():
        shape = base.shape(name)
        pair = pairs.get(name.removesuffix(".weight"))

        def load(name: str = name, pair: LoraPair | None = pair) -> np.ndarray:
            weight = base.read(name)
            if pair is not None:
                weight = weight + pair.delta()  # in HF row order, before the Q/K reorder
            return base.to_llama_rows(name, weight)

        planned.append(PlannedTensor(base.gguf_name(name), shape, weight_kind(shape, dtype), load))
    return planned


def adapter_tensors(base: BaseModel, adapter: Adapter) -> list[PlannedTensor]:
    """``A`` as (rank, in), ``B`` as (out, rank): llama.cpp's order, B rows as the base's rows."""
    planned = []
    for pair in adapter.pairs:
        name = base.gguf_name(f"{pair.module}.weight")

        def load_a(pair: LoraPair = pair) -> np.ndarray:
            return pair.a

        def load_b(pair: LoraPair = pair) -> np.ndarray:
            return base.to_llama_rows(pair.module, adapter.b_for_llama_cpp(pair))

        planned.append(PlannedTensor(f"{name}.lora_a", pair.a.shape, "f16", load_a))
        planned.append(PlannedTensor(f"{name}.lora_b", pair.b.shape, "f16", load_b))
    return planned


def _check_fits(base: BaseModel, adapter: Adapter) -> None:
    weights = set(base.weight_names())
    for pair in adapter.pairs:
        weight = f"{pair.module}.weight"
        if weight not in weights:
            tied = pair.module.endswith("lm_head") and base.tied
            raise UserError(
                f"the adapter adapts {pair.module}, which "
                + (
                    "is tied to the token embeddings: llama.cpp cannot apply a LoRA to it"
                    if tied
                    else f"the base {base.directory} does not have: is it the run's base?"
                )
            )
        rows, columns = base.shape(weight)
        if pair.b.shape[0] != rows or pair.a.shape[1] != columns:
            raise UserError(
                f"the adapter's {pair.module} is {pair.b.shape[0]}x{pair.a.shape[1]} but the base's "
                f"is {rows}x{columns}: is {base.directory} the run's base?"
            )


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "f16",
    merged: bool = False,
    system: str | None = None,
    progress: bool = True,
) -> ExportResult:
    from finetune.run import ADAPTER_DIR, base_model, require_run_dir

    start = time.monotonic()
    out = Path(out_dir).expanduser()
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    run = require_run_dir(run_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: choose a directory for --out")
    adapter_dir = run / ADAPTER_DIR
    adapter = read_adapter(adapter_dir)
    base = open_base(base_model(adapter_dir))
    _check_fits(base, adapter)

    from finetune.export.modelfile import modelfile_text, readme_text
    from finetune.export.vocab import adds_bos
    from finetune.modeling import load_tokenizer

    tokenizer = load_tokenizer(adapter_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = ExportResult(out)
    name = run.resolve().name

    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    say(f"writing {out / BASE_FILE} ({dtype}) from {base.directory}")
    base_meta = _model_metadata(base, tokenizer, adapter_dir, dtype, name)
    write_gguf(out / BASE_FILE, base_meta, base_tensors(base, dtype, {}), progress=progress)
    say(f"writing {out / ADAPTER_FILE}")
    write_gguf(
        out / ADAPTER_FILE,
        _adapter_metadata(adapter, name),
        adapter_tensors(base, adapter),
        progress=progress,
    )
    names = [BASE_FILE, ADAPTER_FILE]
    if merged:
        say(f"writing {out / MERGED_FILE} ({dtype})")
        by_module = {pair.module: pair for pair in adapter.pairs}
        write_gguf(
            out / MERGED_FILE, base_meta, base_tensors(base, dtype, by_module), progress=progress
        )
        names.append(MERGED_FILE)
    bos = adds_bos(tokenizer)
    _write_text(out / MODELFILE, modelfile_text(tokenizer, adds_bos=bos, system=system))
    result.files = {n: (out / n).stat().st_size for n in names}
    _write_text(
        out / README, readme_text(run=name, files=result.files, merged=merged, adds_bos=bos)
    )
    result.files[MODELFILE] = (out / MODELFILE).stat().st_size
    result.seconds = time.monotonic() - start
    return result
