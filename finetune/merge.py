"""``python -m finetune merge``: fold a run's adapter into a 16-bit copy of its base.

For servers that cannot load LoRA adapters. The merge is done on an
unquantized base (merging into 4-bit weights would round the adapter's small
update away) and on the CPU, since a 16-bit 7B model does not fit the 8 GB
card it was trained on. The bot itself keeps the adapter unmerged so one model
serves base and finetuned rows; a merged copy cannot do that.
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import UserError
from finetune.run import ADAPTER_DIR, base_model, require_run_dir

DTYPES = ("bfloat16", "float16", "float32")


def merge_run(run_dir: str | Path, out_dir: str | Path, *, dtype: str = "bfloat16") -> Path:
    """Write the merged model and the run's tokenizer (with its chat template) to ``out_dir``."""
    out = Path(out_dir).expanduser()
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    run = require_run_dir(run_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} is not empty or not a directory: choose a new --out directory")

    import torch

    from finetune.modeling import QuantOptions, load_adapter, load_base_model, load_tokenizer

    tokenizer = load_tokenizer(run / ADAPTER_DIR)
    base = load_base_model(
        base_model(run / ADAPTER_DIR),
        quant=QuantOptions(load_in_4bit=False),
        device="cpu",
        dtype=getattr(torch, dtype),
    )
    merged = load_adapter(base, run / ADAPTER_DIR).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
