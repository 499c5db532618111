"""Training throughput: packed, padding-free batches vs padded batches, on the same data.

Forum answers range from one line to several paragraphs, so a padded batch
spends much of its compute on padding. This trains the tiny model on CPU for
one epoch of the same rows both ways (trl's SFTTrainer, LoRA as in
configs/tiny-cpu.yaml) and compares real (non-padding) tokens per second.

    python benchmarks/train_throughput.py [--model DIR] [--rows N]

The last line is JSON: {"packing_vs_padding": x, ...}; the target is x >= 1.5.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune.config import parse_config  # noqa: E402
from finetune.data import load_dataset_dir, to_hf_dataset  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "dataset"
MAX_LENGTH = 512
BATCH_ROWS = 8  # forum rows per padded batch
PACKED_ROWS = 2  # MAX_LENGTH sequences per packed batch: about the real tokens of a padded one
# Wider than the test model: at hidden size 64, attention over a packed sequence costs more
# than the model's linear layers, the opposite of Mistral-7B (hidden 4096), where the
# projections dominate. Hidden 512 keeps the tiny model's compute shaped like the real one's.
BENCH_SPEC = dict(
    hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4
)


def forum_like_rows(count: int, seed: int = 0) -> list[dict]:
    """Fixture Q/A rows whose answers run from one to eight paragraphs, like real threads."""
    base = load_dataset_dir(FIXTURE).train
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        row = base[index % len(base)]
        paragraphs = [base[rng.randrange(len(base))]["completion"][0]["content"]]
        paragraphs += [
            base[rng.randrange(len(base))]["completion"][0]["content"]
            for _ in range(min(7, int(rng.expovariate(0.6))))
        ]
        rows.append(
            {
                "prompt": row["prompt"],
                "completion": [{"role": "assistant", "content": "\n\n".join(paragraphs)}],
            }
        )
    return rows


def run_epoch(model_dir: Path, rows: list[dict], packing: bool) -> tuple[int, float]:
    """Train one epoch; return (real tokens trained on, seconds)."""
    import torch
    from transformers import ProgressCallback

    from finetune.modeling import attach_new_adapter, load_base_model, load_tokenizer
    from finetune.run import quant_options
    from finetune.train import lora_config, sft_trainer

    never = str(1_000_000)
    with tempfile.TemporaryDirectory() as scratch:
        # configs/tiny-cpu.yaml's run, as `python -m finetune` builds it, on these batches
        config = parse_config(
            [
                "--config",
                str(REPO / "configs" / "tiny-cpu.yaml"),
                "--output-dir",
                scratch,
                # a packed row is one MAX_LENGTH sequence holding several forum rows
                "--per-device-train-batch-size",
                str(PACKED_ROWS if packing else BATCH_ROWS),
                "--max-length",
                str(MAX_LENGTH),
                f"--packing={packing}",
                "--max-steps",
                never,
                "--eval-steps",
                never,
                "--save-steps",
                never,
                "--logging-steps",
                never,
            ]
        )
        torch.manual_seed(0)
        tokenizer = load_tokenizer(model_dir)
        model = attach_new_adapter(
            load_base_model(model_dir, quant=quant_options(config), device="cpu"),
            lora_config(config),
        )
        train_dataset = to_hf_dataset(rows)
        trainer = sft_trainer(
            model, tokenizer, config, "cpu", train_dataset, train_dataset.select(range(1))
        )
        trainer.remove_callback(ProgressCallback)
        dataset = trainer.train_dataset
        trainer.args.max_steps = math.ceil(len(dataset) / trainer.args.per_device_train_batch_size)
        tokens = sum(len(ids) for ids in dataset["input_ids"])
        if not packing:
            print(
                f"padding: {1 - tokens / padded_size(dataset['input_ids']):.0%} of padded batches"
            )
        started = time.perf_counter()
        trainer.train()
        return tokens, time.perf_counter() - started


def padded_size(rows: list[list[int]]) -> int:
    """Tokens in the padded batches of one shuffled epoch (each row padded to its batch's longest)."""
    lengths = [len(ids) for ids in rows]
    random.Random(0).shuffle(lengths)
    batches = [lengths[i : i + BATCH_ROWS] for i in range(0, len(lengths), BATCH_ROWS)]
    return sum(len(batch) * max(batch) for batch in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (a wide tiny model is built if omitted)")
    parser.add_argument("--rows", type=int, default=240, help="training rows")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(args.model) if args.model else None
        if model_dir is None:
            from finetune.tiny_model import TinyModelSpec, build_tiny_model

            spec = TinyModelSpec(**BENCH_SPEC)
            model_dir = build_tiny_model(Path(scratch) / "tiny", seed=0, spec=spec)
        rows = forum_like_rows(args.rows)
        run_epoch(model_dir, rows[:32], packing=False)  # warm-up: imports, kernels, allocator
        padded_tokens, padded_s = run_epoch(model_dir, rows, packing=False)
        packed_tokens, packed_s = run_epoch(model_dir, rows, packing=True)

    padded_rate, packed_rate = padded_tokens / padded_s, packed_tokens / packed_s
    print(f"padded : {padded_tokens} tokens in {padded_s:.2f} s = {padded_rate:,.0f} tokens/s")
    print(f"packed : {packed_tokens} tokens in {packed_s:.2f} s = {packed_rate:,.0f} tokens/s")
    ratio = packed_rate / padded_rate
    print(f"packing vs padding: {ratio:.2f}x (target >= 1.5)")
    print(
        json.dumps(
            {
                "packing_vs_padding": round(ratio, 3),
                "padded_tokens_per_s": round(padded_rate, 1),
                "packed_tokens_per_s": round(packed_rate, 1),
                "rows": len(rows),
                "max_length": MAX_LENGTH,
                "device": "cpu",
            }
        )
    )


if __name__ == "__main__":
    main()
