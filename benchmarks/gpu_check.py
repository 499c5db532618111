"""The GPU check: measure, on one NVIDIA GPU, the numbers the product's claims rest on.

Run it the day a GPU is lent (docs/finetune.md, "The GPU check"):

    python benchmarks/gpu_check.py              # one NVIDIA GPU, under 8 minutes
    python benchmarks/gpu_check.py --dry-run    # CPU, toy size: checks the script itself

Nothing is downloaded. A model with Mistral-7B's exact shapes (transformers'
``MistralConfig`` defaults) and random weights is written to a scratch
directory one layer at a time (the 16-bit model is never whole in memory),
then measured through the product's own code:

* ``load``: loading it 4-bit NF4 with :func:`finetune.modeling.load_base_model`;
* ``qlora``: peak GPU memory and tokens/s of trl's SFTTrainer with the
  settings ``python -m finetune`` derives from ``configs/mistral-7b-8gb.yaml``,
  at sequence 1024 × batch 2 (goal: peak ≤ 6 GiB, inside an 8 GB card);
* ``serving``: the continuous-batching worker's tokens/s with 1, 4 and 16
  users at once, base and finetuned rows mixed, against plain
  ``model.generate`` one request at a time.

It needs torch, transformers, peft and accelerate. Without bitsandbytes
(4-bit) or trl (training) it says how to bring them as wheels and measures
what it can: 16-bit loading and serving. The last line of output is JSON.
``--without MODULE,…`` makes modules unimportable, to see that path.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 1024**3
GOAL_PEAK_GIB = 6.0
# The packages a CUDA PyTorch image may lack, with what each one enables here.
OPTIONAL = {
    "bitsandbytes": "4-bit NF4 loading (QLoRA and the 4-bit worker)",
    "trl": "the QLoRA training measurement (trl's SFTTrainer, with datasets)",
    "datasets": "the QLoRA training measurement (trl's datasets)",
}
# Imported by the project's serving code for its metrics and .env file only: stood in for
# when absent, so the worker can be measured in a bare CUDA image.
SHIMMED = ("prometheus_client", "dotenv")


@dataclass(frozen=True)
class Size:
    """What one run measures; the dry run is the same code at a toy size."""

    shape: str
    seq: int
    batch: int
    train_steps: int
    users: tuple[int, ...]
    new_tokens: int
    sequential_requests: int
    budget_s: float


FULL = Size("mistral-7b", 1024, 2, 3, (1, 4, 16), 64, 4, 450.0)
DRY = Size("toy", 64, 2, 2, (1, 2, 4), 8, 2, 300.0)
TOY_SHAPE = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- the environment ----------------------------------------------------------------------------


def block(names: Sequence[str]) -> None:
    """Make ``names`` unimportable, as if not installed (``--without``).

    ``None`` in ``sys.modules`` fails ``import`` and makes ``importlib.util.find_spec``
    answer None, which is how transformers and peft ask whether a package is there.
    """
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def shim_missing() -> list[str]:
    """No-op stand-ins for the serving code's metrics and .env modules, where they are absent."""
    shimmed = []
    if not importable("prometheus_client"):

        class _Metric:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                pass

            def labels(self, *args: Any, **kwargs: Any) -> _Metric:
                return self

            def __getattr__(self, name: str) -> Callable[..., None]:
                return lambda *args, **kwargs: None

        module = types.ModuleType("prometheus_client")
        module.Counter = module.Gauge = module.Histogram = _Metric  # type: ignore[attr-defined]
        sys.modules["prometheus_client"] = module
        shimmed.append("prometheus_client")
    if not importable("dotenv"):
        module = types.ModuleType("dotenv")
        module.find_dotenv = lambda *args, **kwargs: ""  # type: ignore[attr-defined]
        module.load_dotenv = lambda *args, **kwargs: False  # type: ignore[attr-defined]
        sys.modules["dotenv"] = module
        shimmed.append("dotenv")
    return shimmed


def locked_versions(names: Sequence[str]) -> dict[str, str]:
    """The versions requirements.lock pins, so the wheels brought match what the project tests."""
    pins: dict[str, str] = {}
    lock = REPO / "requirements.lock"
    if lock.is_file():
        for line in lock.read_text(encoding="utf-8").splitlines():
            name, sep, version = line.strip().partition("==")
            if sep and name.lower() in names:
                pins[name.lower()] = version.split()[0]
    return pins


def wheel_instructions(missing: Sequence[str]) -> str:
    """How to bring ``missing`` to a machine that cannot reach a package index."""
    pins = locked_versions(missing)
    specs = " ".join(f"{n}=={pins[n]}" if n in pins else n for n in missing)
    python = f"{sys.version_info.major}{sys.version_info.minor}"
    machine = platform.machine() or "x86_64"
    return "\n".join(
        [
            f"missing: {', '.join(missing)} — needed for: "
            + "; ".join(OPTIONAL.get(n, n) for n in missing),
            "bring them as wheels: on a machine with internet access run",
            f"  pip download --dest wheels --only-binary=:all: --python-version {python} "
            f"--platform manylinux_2_28_{machine} --platform manylinux2014_{machine} {specs}",
            "copy wheels/ here, then",
            f"  pip install --no-index --find-links wheels {specs}",
            "and run this check again. Measuring what runs without them now.",
        ]
    )


def environment(without: Sequence[str]) -> dict[str, Any]:
    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "accelerate", *OPTIONAL):
        if importable(name):
            try:
                versions[name] = getattr(importlib.import_module(name), "__version__", "?")
            except ImportError as error:  # installed but broken (e.g. no CUDA library)
                versions[name] = f"broken: {error}"
        else:
            versions[name] = None
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / GIB, 1)}
    return {
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "gpu": gpu,
        "versions": versions,
        "without": list(without),
    }


# ---- the model ----------------------------------------------------------------------------------


def model_config(shape: str, vocab: int) -> Any:
    from transformers import MistralConfig

    if shape == "toy":
        return MistralConfig(**TOY_SHAPE, tie_word_embeddings=False, sliding_window=None)
    config = MistralConfig()  # Mistral-7B: 32 layers, hidden 4096, MLP 14336, 8 KV heads
    assert config.vocab_size >= vocab
    return config


def write_random_model(out: Path, shape: str, device: str) -> dict[str, Any]:
    """A loadable checkpoint with random weights, written one decoder layer per shard.

    Each shard is drawn on ``device`` and copied out, so a 7B model needs no
    more than one layer (~0.4 GiB) of GPU or CPU memory. The LM head's rows
    past the tokenizer's vocabulary are zero, so greedy decoding stays inside it.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import MistralForCausalLM

    from finetune.tiny_model import DEFAULT_CORPUS, train_tokenizer

    started = time.perf_counter()
    tokenizer = train_tokenizer(DEFAULT_CORPUS.read_text(encoding="utf-8"), 1024)
    config = model_config(shape, len(tokenizer))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MistralForCausalLM(config).state_dict().items()}

    def shard_of(name: str) -> str:
        parts = name.split(".")
        return f"layer-{int(parts[2]):03d}" if parts[1:2] == ["layers"] else "outer"

    shards: dict[str, list[str]] = {}
    for name in shapes:
        shards.setdefault(shard_of(name), []).append(name)
    generator = torch.Generator(device=device).manual_seed(0)
    weight_map, total = {}, 0
    out.mkdir(parents=True, exist_ok=True)
    for shard, names in sorted(shards.items()):
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                value = torch.ones(shapes[name], dtype=torch.bfloat16, device=device)
            else:
                value = torch.randn(shapes[name], generator=generator, device=device) * 0.02
                value = value.to(torch.bfloat16)
            if name == "lm_head.weight":
                value[len(tokenizer) :] = 0
            tensors[name] = value.cpu().contiguous()
            total += value.numel()
        filename = f"model-{shard}.safetensors"
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 2 * total}, "weight_map": weight_map}),
        encoding="utf-8",
    )
    config.dtype = "bfloat16"
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "shape": shape,
        "parameters": total,
        "bytes_on_disk": sum(p.stat().st_size for p in out.glob("*.safetensors")),
        "write_s": round(time.perf_counter() - started, 1),
    }


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ---- the measurements ---------------------------------------------------------------------------


def measure_load(model_dir: Path, device: str, four_bit: bool) -> tuple[Any, dict[str, Any]]:
    """The base loaded as the product loads it, and how long that took."""
    import torch

    from finetune.modeling import QuantOptions, load_base_model

    synchronize(device)
    started = time.perf_counter()
    model = load_base_model(model_dir, quant=QuantOptions(load_in_4bit=four_bit), device=device)
    synchronize(device)
    result: dict[str, Any] = {
        "load_in_4bit": four_bit,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if device.startswith("cuda"):
        result["weights_gib"] = round(torch.cuda.memory_allocated() / GIB, 3)
    return model, result


def finetune_settings(size: Size, model_dir: Path, config_path: Path) -> Any:
    from finetune.config import parse_config

    never = str(100 * size.train_steps)
    return parse_config(
        [
            "--config",
            str(config_path),
            "--model",
            str(model_dir),
            "--max-steps",
            str(size.train_steps),
            "--per-device-train-batch-size",
            str(size.batch),
            "--max-length",
            str(size.seq),
            "--eval-steps",
            never,
            "--save-steps",
            never,
            "--logging-steps",
            "1",
        ]
    )


def measure_qlora(
    model: Any, model_dir: Path, size: Size, config_path: Path, device: str, scratch: Path
) -> tuple[Path, dict[str, Any]]:
    """Train ``size.train_steps`` optimizer steps; tokens/s from the second step on."""
    import torch
    from datasets import Dataset
    from transformers import ProgressCallback, TrainerCallback

    from finetune.modeling import attach_new_adapter, load_tokenizer, save_adapter
    from finetune.train import lora_config, sft_trainer

    config = finetune_settings(size, model_dir, config_path)
    config.output_dir = str(scratch / "run")
    tokenizer = load_tokenizer(model_dir)
    peft_model = attach_new_adapter(model, lora_config(config))
    sequences = size.train_steps * config.gradient_accumulation_steps * size.batch
    ids = torch.randint(
        3, len(tokenizer), (sequences, size.seq), generator=torch.Generator().manual_seed(0)
    )
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})  # pre-tokenized, all trained on

    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            step_ends.append(time.perf_counter())

    trainer = sft_trainer(
        peft_model,
        tokenizer,
        config,
        device,
        dataset,
        dataset.select(range(size.batch)),
        callbacks=[StepClock()],
    )
    trainer.remove_callback(ProgressCallback)  # its bar and raw dicts; the report says it all
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    synchronize(device)
    tokens_per_step = config.gradient_accumulation_steps * size.batch * size.seq
    timed = step_ends[1:] if len(step_ends) > 1 else step_ends
    first = step_ends[0] if len(step_ends) > 1 else started
    seconds = timed[-1] - first
    result: dict[str, Any] = {
        "config": str(
            config_path.relative_to(REPO) if config_path.is_relative_to(REPO) else config_path
        ),
        "seq": size.seq,
        "batch": size.batch,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "lora_r": config.lora_r,
        "gradient_checkpointing": config.gradient_checkpointing,
        "optimizer": trainer.args.optim.value
        if hasattr(trainer.args.optim, "value")
        else str(trainer.args.optim),
        "steps": len(step_ends),
        "first_step_s": round(step_ends[0] - started, 2),
        "tokens_per_s": round(tokens_per_step * len(timed) / seconds, 1),
    }
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
        result["peak_gib"] = round(peak / GIB, 3)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
        result["goal_gib"] = GOAL_PEAK_GIB
        result["meets_goal"] = peak <= GOAL_PEAK_GIB * GIB
    adapter = save_adapter(trainer.model, scratch / "adapter", tokenizer)
    del trainer, peft_model
    return adapter, result


def random_adapter(model: Any, model_dir: Path, scratch: Path, config_path: Path) -> Path:
    """Without trl there is no trained adapter: a random one of the config's LoRA shape serves.

    Read from the YAML directly: the project's config parser is trl's and needs it.
    """
    import torch
    import yaml
    from peft import LoraConfig

    from finetune.modeling import attach_new_adapter, load_tokenizer, save_adapter

    settings = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    lora = LoraConfig(
        r=settings.get("lora_r", 16),
        lora_alpha=settings.get("lora_alpha", 32),
        target_modules=settings.get("lora_target_modules", ["all-linear"]),
        init_lora_weights=False,  # non-zero B: the finetuned rows really differ
        task_type="CAUSAL_LM",
    )
    if lora.target_modules == {"all-linear"}:
        lora.target_modules = "all-linear"
    torch.manual_seed(0)
    peft_model = attach_new_adapter(model, lora)
    return save_adapter(peft_model, scratch / "adapter", load_tokenizer(model_dir))


QUESTIONS = [
    "What length skis should I get for park if I'm 180 cm?",
    "Is it worth waxing my skis myself?",
    "How do I stop my tips crossing in powder?",
    "Are twin tips okay for carving on groomers?",
]


def question(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


async def worker_rates(engine: Any, users: Sequence[int]) -> dict[str, Any]:
    """Tokens/s with ``n`` questions in flight at once, base and finetuned alternating."""
    await engine.generate(question(0), variant="finetuned")  # warm up kernels and caches
    rates = {}
    for n in users:
        started = time.perf_counter()
        answers = await asyncio.gather(
            *(
                engine.generate(question(i), variant="finetuned" if i % 2 else "base")
                for i in range(n)
            )
        )
        seconds = time.perf_counter() - started
        tokens = sum(a.completion_tokens for a in answers)
        rates[str(n)] = {"tokens_per_s": round(tokens / seconds, 1), "tokens": tokens}
    return rates


def generate_one_at_a_time(model: Any, tokenizer: Any, size: Size, device: str) -> dict[str, Any]:
    """Plain ``model.generate``, one request after another, base and finetuned alternating."""
    import contextlib

    import torch

    def ask(i: int) -> int:
        ids = tokenizer.apply_chat_template(
            question(i), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"].to(model.device)
        off = model.disable_adapter() if i % 2 == 0 else contextlib.nullcontext()
        with off, torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=size.new_tokens,
                min_new_tokens=size.new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        return int(out.shape[1] - ids.shape[1])

    ask(1)  # warm up
    synchronize(device)
    started = time.perf_counter()
    tokens = sum(ask(i) for i in range(size.sequential_requests))
    synchronize(device)
    seconds = time.perf_counter() - started
    return {
        "requests": size.sequential_requests,
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
    }


async def serve_and_close(engine: Any, users: Sequence[int]) -> dict[str, Any]:
    await engine.start()
    try:
        return await worker_rates(engine, users)
    finally:
        await engine.close()


def measure_serving(
    model_dir: Path, adapter: Path, size: Size, device: str, four_bit: bool
) -> dict[str, Any]:
    from bot.serving.local_engine import LocalEngine
    from bot.serving.settings import EngineSettings
    from finetune.modeling import load_for_inference

    model, tokenizer = load_for_inference(model_dir, adapter, load_in_4bit=four_bit, device=device)
    # Every answer runs its full length: the rates measure the worker, not where a
    # random model happens to stop.
    model.get_base_model().generation_config.min_new_tokens = size.new_tokens
    settings = EngineSettings(
        base_model=str(model_dir),
        adapter_path=adapter,
        load_in_4bit=four_bit,
        max_batch=max(size.users),
        queue_size=4 * max(size.users),
        max_new_tokens=size.new_tokens,
        temperature=0.0,
        repetition_penalty=1.0,
    )

    engine = LocalEngine(settings, model_and_tokenizer=(model, tokenizer))

    worker = asyncio.run(serve_and_close(engine, size.users))
    plain = generate_one_at_a_time(model, tokenizer, size, device)
    del model, engine
    return {
        "load_in_4bit": four_bit,
        "new_tokens": size.new_tokens,
        "worker_by_users": worker,
        "generate_one_at_a_time": plain,
        "speedup_at_most_users": round(
            worker[str(max(size.users))]["tokens_per_s"] / plain["tokens_per_s"], 2
        ),
    }


# ---- the run ------------------------------------------------------------------------------------


class Budget:
    """The whole check stays inside ``seconds``; a phase that would not fit is skipped, and said."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def allows(self, needed_s: float) -> bool:
        return self.left() >= needed_s


def attempt(report: dict[str, Any], key: str, measure: Callable[[], tuple[Any, dict]]) -> Any:
    """Run one measurement into ``report[key]``; a failure (out of memory…) is reported, not fatal.

    Returns what the measurement hands on (the model, the adapter), or None when it failed.
    """
    try:
        handed_on, report[key] = measure()
    except Exception as error:  # the check goes on and says what broke
        report[key] = {"failed": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        handed_on = None
    say(f"      {report[key]}")
    return handed_on


def check(args: argparse.Namespace) -> dict[str, Any]:
    size = DRY if args.dry_run else FULL
    budget = Budget(args.budget_s or size.budget_s)
    block(args.without)
    shimmed = shim_missing()
    import torch

    report: dict[str, Any] = {
        "check": "gpu_check",
        "dry_run": args.dry_run,
        "environment": environment(args.without),
        "shimmed": shimmed,
    }
    if args.dry_run:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda:0"
    else:
        raise SystemExit(
            "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); "
            "run it on the GPU machine, or --dry-run to check the script on CPU"
        )
    missing = [n for n in OPTIONAL if not importable(n)]
    if missing:
        say(wheel_instructions(missing))
        report["missing"] = missing
    four_bit = "bitsandbytes" not in missing
    can_train = four_bit and "trl" not in missing and "datasets" not in missing

    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=args.scratch) as tmp:
        scratch = Path(tmp)
        needed = 16 * GIB if size.shape == "mistral-7b" else 0
        if shutil.disk_usage(scratch).free < needed:
            raise SystemExit(
                f"gpu_check: {scratch} has less than 16 GiB free for the random 7B checkpoint: "
                "pass --scratch DIR on a larger disk"
            )
        say(f"[1/4] writing a random {size.shape} checkpoint to {scratch}")
        report["checkpoint"] = write_random_model(scratch / "model", size.shape, device)
        say(f"      {report['checkpoint']}")

        say(f"[2/4] loading it {'4-bit NF4' if four_bit else '16-bit (no bitsandbytes)'}")
        loaded = attempt(report, "load", lambda: measure_load(scratch / "model", device, four_bit))
        if loaded is None:
            report["elapsed_s"] = round(budget.seconds - budget.left(), 1)
            return report  # nothing else can run without the model
        model = loaded

        config_path = Path(args.config).resolve()
        say("[3/4] QLoRA training")
        adapter = None
        if not can_train:
            report["qlora"] = {"skipped": "needs " + ", ".join(sorted(set(missing)))}
        elif not budget.allows(args.reserve_serving_s):
            report["qlora"] = {"skipped": f"out of time ({budget.left():.0f} s left)"}
        else:
            adapter = attempt(
                report,
                "qlora",
                partial(
                    measure_qlora, model, scratch / "model", size, config_path, device, scratch
                ),
            )
            if adapter is None:  # training failed midway: the model is no longer a plain base
                del model
                free(device)
                model, _ = measure_load(scratch / "model", device, four_bit)
        say(f"      {report['qlora']}")
        if adapter is None:
            adapter = random_adapter(model, scratch / "model", scratch, config_path)
        del model
        free(device)

        say("[4/4] serving: the worker at 1, 4, 16 users vs model.generate one at a time")
        if budget.allows(30 if args.dry_run else 90):
            attempt(
                report,
                "serving",
                lambda: (None, measure_serving(scratch / "model", adapter, size, device, four_bit)),
            )
        else:
            report["serving"] = {"skipped": f"out of time ({budget.left():.0f} s left)"}
            say(f"      {report['serving']}")
    report["elapsed_s"] = round(budget.seconds - budget.left(), 1)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy size: check the script")
    parser.add_argument(
        "--config",
        default=str(REPO / "configs" / "mistral-7b-8gb.yaml"),
        help="training settings to measure (default: configs/mistral-7b-8gb.yaml)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=0, help="stop starting phases after this (default 450)"
    )
    parser.add_argument(
        "--reserve-serving-s",
        type=float,
        default=150,
        help="time kept for serving: training is skipped when less than this is left",
    )
    parser.add_argument("--scratch", default=None, help="where to write the random checkpoint")
    parser.add_argument(
        "--without",
        type=lambda text: [n for n in text.split(",") if n],
        default=[],
        help="comma-separated modules to treat as missing, e.g. bitsandbytes,trl",
    )
    args = parser.parse_args(argv)
    report = check(args)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
