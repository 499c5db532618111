"""Peak GPU memory and training tokens/s of QLoRA on a Mistral-7B-shaped model.

The model has Mistral-7B's exact shapes (transformers' MistralConfig defaults)
and random weights, so nothing is downloaded: it is built on the meta device
and each decoder linear layer is quantized to 4-bit NF4 (double quantization)
one at a time, so building it never holds the 16-bit model. Training is the
product's own path: trl's SFTTrainer with the arguments and LoRA settings that
``python -m finetune`` derives from configs/mistral-7b-8gb.yaml, on random
token sequences of ``--seq`` tokens, ``--batch`` per step.

    python benchmarks/qlora_memory.py [--config FILE] [--seq 1024] [--batch 2] [--steps 10]

The last line is JSON with peak memory (GiB, torch's max allocated) and tokens/s.
Targets: peak <= 8 GiB, aim <= 6 GiB. ``--shape tiny --device cpu`` runs the
same code on a tiny shape, to check the script itself without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
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

GIB = 1024**3
TINY_SHAPE = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def build_random_4bit_model(shape: str, device: str, dtype):
    """A MistralForCausalLM with random weights, decoder linears in 4-bit NF4, on ``device``."""
    import bitsandbytes as bnb
    import torch
    from torch import nn
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**TINY_SHAPE) if shape == "tiny" else MistralConfig()
    config.dtype = dtype
    with torch.device("meta"):
        model = MistralForCausalLM(config)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(
                    linear.in_features,
                    linear.out_features,
                    bias=False,
                    compute_dtype=dtype,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                weight = torch.randn(linear.weight.shape, dtype=dtype, device=device) * 0.02
                quantized.weight = bnb.nn.Params4bit(
                    weight, requires_grad=False, compress_statistics=True, quant_type="nf4"
                ).to(device)
                setattr(parent, name, quantized)
    for module in model.modules():  # embeddings, norms, LM head: 16-bit, frozen
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                init = torch.ones if "norm" in type(module).__name__.lower() else torch.randn
                value = init(param.shape, dtype=dtype, device=device)
                value = value if init is torch.ones else value * 0.02
                setattr(module, name, nn.Parameter(value, requires_grad=False))
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    # The flag trl reads to treat the model as QLoRA (LoRA weights cast to bf16, as in a real run).
    model.is_loaded_in_4bit = True
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "mistral-7b-8gb.yaml"))
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps")
    parser.add_argument("--shape", choices=("mistral-7b", "tiny"), default="mistral-7b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "error: no CUDA GPU visible: this benchmark measures GPU memory "
            "(use --shape tiny --device cpu only to check the script)",
            file=sys.stderr,
        )
        sys.exit(2)

    from datasets import Dataset

    from finetune.modeling import attach_new_adapter, compute_dtype
    from finetune.tiny_model import DEFAULT_CORPUS, train_tokenizer
    from finetune.train import lora_config, sft_trainer

    device = "cuda:0" if args.device == "cuda" else "cpu"
    dtype = compute_dtype(device)
    config = parse_config(
        [
            "--config",
            args.config,
            "--max-steps",
            str(args.steps),
            "--per-device-train-batch-size",
            str(args.batch),
            "--max-length",
            str(args.seq),
            "--eval-steps",
            str(10 * args.steps),
            "--save-steps",
            str(10 * args.steps),
            "--logging-steps",
            "1",
        ]
    )
    model = build_random_4bit_model(args.shape, device, dtype)
    model = attach_new_adapter(model, lora_config(config))
    tokenizer = train_tokenizer(DEFAULT_CORPUS.read_text(encoding="utf-8"), 1024)
    generator = torch.Generator().manual_seed(0)
    sequences = config.max_steps * config.gradient_accumulation_steps * args.batch
    ids = torch.randint(
        3, min(model.config.vocab_size, 1024), (sequences, args.seq), generator=generator
    )
    dataset = Dataset.from_dict(
        {"input_ids": ids.tolist()}
    )  # pre-tokenized: trl trains on all of it

    with tempfile.TemporaryDirectory() as scratch:
        config.output_dir = scratch
        trainer = sft_trainer(
            model, tokenizer, config, device, dataset, dataset.select(range(args.batch))
        )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            weights = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer.train()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started

    tokens = sequences * args.seq
    result = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "seq": args.seq,
        "batch": args.batch,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "steps": config.max_steps,
        "lora_r": config.lora_r,
        "tokens_per_s": round(tokens / seconds, 1),
    }
    if device.startswith("cuda"):
        result["model_gib"] = round(weights / GIB, 3)
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
        print(
            f"model on GPU: {result['model_gib']:.2f} GiB; training peak {result['peak_gib']:.2f} GiB"
        )
    print(f"{tokens} tokens in {seconds:.1f} s = {result['tokens_per_s']:,.0f} tokens/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
