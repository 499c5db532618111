"""GGUF export on SmolLM2: time, file sizes, and agreement with transformers in llama.cpp.

Builds a run on SmolLM2-135M-Instruct with a random LoRA adapter (rank and
alpha as configs/smollm2-cpu.yaml, all linear layers, no modules_to_save),
exports it as f16 (with merged.gguf) and as q8_0, and, when llama-cpp-python
is installed, measures in llama.cpp: tokenizer ids against Hugging Face's on
forum text, and teacher-forced next-token argmax agreement and mean log-prob
error against transformers (float32 base, PEFT adapter) for base, base +
adapter, merged and q8_0. Also prints what a Mistral-7B export weighs, from
its architecture (no weights needed).

    python benchmarks/gguf_export.py [--model .cache/smollm2-135m-instruct]

The last line is JSON with every figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Mistral-7B-Instruct-v0.2's config.json, and configs/mistral-7b-8gb.yaml's adapter
MISTRAL_7B = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}
MISTRAL_LORA_RANKS = (2, 16)


def mistral_7b_sizes() -> dict[str, float]:
    """GiB of base.gguf (f16, q8_0) and adapter.gguf (all-linear LoRA, f16) for Mistral-7B."""
    from finetune.export.writer import PlannedTensor, planned_bytes, weight_kind

    c = MISTRAL_7B
    hidden, kv = (
        c["hidden_size"],
        c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"],
    )
    linear = {
        "q": (hidden, hidden),
        "k": (kv, hidden),
        "v": (kv, hidden),
        "o": (hidden, hidden),
        "gate": (c["intermediate_size"], hidden),
        "up": (c["intermediate_size"], hidden),
        "down": (hidden, c["intermediate_size"]),
    }
    shapes = [(c["vocab_size"], hidden)] * 2 + [(hidden,)]  # embeddings, output, final norm
    for _ in range(c["num_hidden_layers"]):
        shapes += [*linear.values(), (hidden,), (hidden,)]
    sizes = {}
    for dtype in ("f16", "q8_0"):
        plan = [PlannedTensor("t", s, weight_kind(s, dtype), lambda: None) for s in shapes]
        sizes[f"mistral7b_base_{dtype}_gib"] = round(planned_bytes(plan) / 2**30, 2)
    for rank in MISTRAL_LORA_RANKS:
        params = c["num_hidden_layers"] * sum(
            rank * (rows + cols) for rows, cols in linear.values()
        )
        sizes[f"mistral7b_adapter_r{rank}_mib"] = round(params * 2 / 2**20, 1)
    return sizes


def make_run(model_dir: Path, root: Path, rank: int, alpha: int) -> Path:
    import torch
    from peft import LoraConfig

    from finetune.config import FinetuneConfig
    from finetune.modeling import (
        QuantOptions,
        attach_new_adapter,
        load_base_model,
        load_tokenizer,
        save_adapter,
    )
    from finetune.report import RESOLVED_CONFIG_FILE

    torch.manual_seed(0)
    model = load_base_model(model_dir, quant=QuantOptions(load_in_4bit=False), device="cpu")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules="all-linear",
        init_lora_weights="gaussian",
        task_type="CAUSAL_LM",
    )
    peft_model = attach_new_adapter(model, config)
    with torch.no_grad():  # a trained adapter's B is far from zero; give it a comparable size
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    run = root / "run"
    save_adapter(peft_model, run / "adapter", load_tokenizer(model_dir))
    FinetuneConfig(model=str(model_dir), dataset="unused").save(run / RESOLVED_CONFIG_FILE)
    return run


def agreements(model_dir: Path, run: Path, f16: Path, q8: Path) -> dict[str, float]:
    from finetune.modeling import load_tokenizer
    from tests.llama_cpp_compare import FORUM_TEXTS, chat_sequences, compare, probe, reference

    tokenizer = load_tokenizer(run / "adapter")
    ids = probe(f16 / "base.gguf", None, texts=FORUM_TEXTS)["tokens"]
    expected = [tokenizer(t)["input_ids"] for t in FORUM_TEXTS]
    same = sum(a == b for a, b in zip(ids, expected, strict=True))
    figures: dict[str, float] = {"tokenizer_texts_identical": same / len(FORUM_TEXTS)}
    sequences = chat_sequences(tokenizer)
    base_ref = reference(model_dir, None, sequences)
    adapter_ref = reference(model_dir, run / "adapter", sequences)
    checks = {
        "base": (base_ref, f16 / "base.gguf", None),
        "base_adapter": (adapter_ref, f16 / "base.gguf", f16 / "adapter.gguf"),
        "merged": (adapter_ref, f16 / "merged.gguf", None),
        "q8_0_adapter": (adapter_ref, q8 / "base.gguf", q8 / "adapter.gguf"),
        "adapter_vs_base_reference": (base_ref, f16 / "base.gguf", f16 / "adapter.gguf"),
    }
    for name, (ref, model, lora) in checks.items():
        agreement, error = compare(ref, model, lora)
        figures[f"{name}_argmax_agreement"] = round(agreement, 4)
        figures[f"{name}_logprob_error_nats"] = round(error, 4)
    figures["positions"] = sum(len(s) for s in sequences)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / ".cache" / "smollm2-135m-instruct"))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    args = parser.parse_args()
    from finetune.export.run import export_run

    model_dir = Path(args.model).resolve()
    result: dict[str, object] = {"model": model_dir.name, **mistral_7b_sizes()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = make_run(model_dir, root, args.rank, args.alpha)
        start = time.perf_counter()
        f16 = export_run(run, root / "f16", merged=True, progress=False)
        result["export_f16_with_merged_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        q8 = export_run(run, root / "q8_0", dtype="q8_0", progress=False)
        result["export_q8_0_s"] = round(time.perf_counter() - start, 1)
        for label, export in (("f16", f16), ("q8_0", q8)):
            for name, size in export.files.items():
                result[f"{label}_{name}_mib"] = round(size / 2**20, 2)
        if importlib.util.find_spec("llama_cpp") is None:
            result["llama_cpp"] = "not installed: no agreement figures"
        else:
            result.update(agreements(model_dir, run, root / "f16", root / "q8_0"))
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
