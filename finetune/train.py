"""QLoRA training with trl's SFTTrainer, writing the run directory (docs/architecture.md).

The frozen base is loaded 4-bit through :mod:`finetune.modeling` (never
upcast: trl no longer calls ``prepare_model_for_kbit_training``, whose fp32
copy of the norms and embeddings an 8 GB card cannot spare), a fresh LoRA
adapter is attached, and trl trains on the completion of each
prompt/completion row, its EOS included.

Resuming (``--resume``) continues from the run's latest checkpoint with the
same step count, optimizer state, RNG and data order. With a larger
``--max-steps`` the run is *extended*: the learning-rate schedule is rebuilt
for the new total and the resumed steps follow it (see :class:`ExtendedSchedule`).

Under ``accelerate launch --num_processes N`` every process trains (DDP) and
checks the run directory, but only the main one writes it (config, dataset
pin, metrics, adapter, report, manifest), so the run reads as one run.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.config import RESOLVED_CONFIG_FILE, FinetuneConfig
from finetune.data import drop_long_rows, load_dataset_dir, to_hf_dataset
from finetune.errors import UserError
from finetune.grounding import dataset_grounding, write_grounding
from finetune.report import (
    LOSS_PLOT_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    SAMPLES_FILE,
    Sample,
    library_versions,
    loss_verdict,
    plot_losses,
    read_metrics,
    render_samples,
    write_json,
)

if TYPE_CHECKING:
    from transformers import TrainerCallback

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"

# Changing any of these between a run and its resumption would train a different model
# (or feed a different data order) under the same run directory.
DATASET_HASH_FILE = "dataset.sha256"
FROZEN_ON_RESUME = (
    "model",
    "load_in_4bit",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_modules_to_save",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "packing",
    "max_length",
    "seed",
)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    manifest: dict[str, Any]


def training_device() -> str:
    """This process's device: its own GPU under ``accelerate launch``, else GPU 0, else CPU."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def is_main_process() -> bool:
    """Whether this process writes the run directory: global rank 0 under ``accelerate launch``.

    Read from the launcher's environment (``RANK``), so the run directory is checked
    before the process group exists, and alone it is always the main process.
    """
    return int(os.environ.get("RANK", "0")) == 0


def launched_processes() -> int:
    """How many processes ``accelerate launch`` (or torchrun) started: ``WORLD_SIZE``, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def write_atomically(path: Path, text: str) -> None:
    """Another process of the launch may be reading ``path``: it sees the old text or the new."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text(text, encoding="utf-8")
    os.replace(scratch, path)


def checkpoint_processes(checkpoint: Path) -> int:
    """How many processes trained up to ``checkpoint``: the Trainer saves one RNG state per process."""
    per_process = list(checkpoint.glob("rng_state_*.pth"))
    return len(per_process) if per_process else 1


def check_same_launch(checkpoint: Path) -> None:
    """A resumed run must keep its process count, or its effective batch and data order change."""
    trained, now = checkpoint_processes(checkpoint), launched_processes()
    if trained != now:
        how = (
            f"accelerate launch --num_processes {trained} -m finetune …"
            if trained > 1
            else "python -m finetune … (one process)"
        )
        raise UserError(
            f"--resume with {now} process(es), but {checkpoint.name} was trained by {trained}: "
            f"resume it as it was started, with {how}"
        )


def effective_batch(config: FinetuneConfig, processes: int) -> int:
    """Rows per optimizer step: per-device batch × accumulation × processes."""
    return config.per_device_train_batch_size * config.gradient_accumulation_steps * processes


def latest_checkpoint(run_dir: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return None
    found = get_last_checkpoint(str(folder))
    return Path(found) if found else None


def prepare_run_dir(
    config: FinetuneConfig, frozen: Sequence[str] = FROZEN_ON_RESUME
) -> Path | None:
    """Create the run directory; return the checkpoint to resume from, if resuming.

    A run with something to lose (a checkpoint, or a finished run's adapter and
    manifest) is never overwritten by accident: reusing its directory needs
    ``--resume``. A start that stopped before its first checkpoint (interrupted,
    or the model failed to load) leaves only ``config.yaml`` and an empty
    ``checkpoints/``: there is nothing to resume, so a new run may start there.
    """
    run_dir = config.run_dir
    saved = run_dir / RESOLVED_CONFIG_FILE
    if not config.resume:
        finished = (run_dir / MANIFEST_FILE).exists() or (run_dir / ADAPTER_DIR).exists()
        if finished or latest_checkpoint(run_dir) is not None:
            raise UserError(
                f"{run_dir} already holds a run: pass --resume to continue it, "
                "or choose a new --output-dir"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        return None
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise UserError(
            f"nothing to resume in {run_dir}: it has no {CHECKPOINTS_DIR}/checkpoint-N "
            "(drop --resume to start a new run there)"
        )
    check_same_launch(checkpoint)
    if saved.is_file():
        previous = type(config).load(saved)
        for key in frozen:
            if getattr(previous, key) != getattr(config, key):
                raise UserError(
                    f"--resume cannot change {key} ({getattr(previous, key)!r} -> "
                    f"{getattr(config, key)!r}): start a new run with another --output-dir"
                )
    return checkpoint


def pin_dataset(run_dir: Path, sha256: str, *, resuming: bool) -> None:
    """A resumed run must see the rows it started with, or "same data order" means nothing.

    The hash is pinned at the start (the manifest only exists at the end), so an
    interrupted run can be checked too; the dataset may move, its content may not.
    """
    pinned = run_dir / DATASET_HASH_FILE
    if resuming and pinned.is_file():  # every process checks; only the main one writes
        started_on = pinned.read_text(encoding="utf-8").strip()
        if started_on != sha256:
            raise UserError(
                f"--resume with different data: the dataset's sha256 is {sha256[:12]}…, "
                f"this run started on {started_on[:12]}…; resume with the original dataset "
                "or start a new run with another --output-dir"
            )
    if is_main_process():
        write_atomically(pinned, sha256 + "\n")


def save_config(config: FinetuneConfig) -> None:
    """The run's resolved config.yaml, written by the main process only."""
    if is_main_process():
        write_atomically(config.run_dir / RESOLVED_CONFIG_FILE, config.to_yaml())


def lora_config(config: FinetuneConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        modules_to_save=list(config.lora_modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def sft_config(config: FinetuneConfig, device: str) -> Any:
    """trl's arguments for this run; precision and optimizer follow the device."""
    from trl import SFTConfig

    return SFTConfig(
        **trainer_arguments(config, device),
        max_length=config.max_length,
        packing=config.packing,
        packing_strategy="bfd",
    )


def trainer_arguments(config: FinetuneConfig, device: str) -> dict[str, Any]:
    """The Trainer arguments every trl trainer of a run shares (SFT here, DPO in finetune.dpo)."""
    import torch

    from finetune.estimate import optimizer_name
    from finetune.modeling import compute_dtype

    on_cuda = device.startswith("cuda")
    dtype = compute_dtype(device)  # the dtype the base was loaded with drives mixed precision
    return dict(
        output_dir=str(config.run_dir / CHECKPOINTS_DIR),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim=optimizer_name(config, on_cuda),
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not on_cuda,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to="none",
        disable_tqdm=False,
        dataloader_num_workers=0,
    )


def peak_memory() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {"bytes": int(torch.cuda.max_memory_allocated()), "kind": "cuda max allocated"}
    # ru_maxrss is KiB on Linux
    return {
        "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "kind": "cpu peak resident set",
    }


def distinct_questions(rows: Sequence[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """One row per question: a thread's replies share a prompt, and samples.md should not repeat it."""
    if limit < 1:
        return []
    seen: set[str] = set()
    chosen = []
    for row in rows:
        key = json.dumps(row["prompt"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            chosen.append(row)
        if len(chosen) == limit:
            break
    return chosen


def write_samples(
    model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], config: FinetuneConfig, path: Path
) -> Path:
    """Ground truth, base and finetuned answers: one mixed-adapter batch per question."""
    from finetune.generation import GenerationSettings, generate_texts
    from finetune.modeling import TRAINING_ADAPTER_NAME

    settings = GenerationSettings(max_new_tokens=config.sample_max_new_tokens)
    samples = []
    model.eval()
    for row in rows:
        base, finetuned = generate_texts(
            model,
            tokenizer,
            [row["prompt"], row["prompt"]],
            settings,
            variants=["base", "finetuned"],
            adapter_name=TRAINING_ADAPTER_NAME,
        )
        samples.append(
            Sample(
                question=row["prompt"][-1]["content"],
                ground_truth=row["completion"][-1]["content"],
                base=base,
                finetuned=finetuned,
            )
        )
    path.write_text(render_samples(samples, f"Samples: {config.model}"), encoding="utf-8")
    return path


def _last(records: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def train_to_the_end(
    trainer: Any, run_dir: Path, checkpoint: Path | None
) -> tuple[Any, list[dict[str, Any]]]:
    """Run ``trainer`` (from ``checkpoint`` when resuming) and make sure the last step is evaluated.

    Shared by SFT and DPO so both say the same on Ctrl-C — where the run can
    be resumed from — and both end with the final step's eval loss in the
    metrics, which the report and the verdict read.
    """
    if checkpoint is not None:
        print(f"resuming from {checkpoint}", file=sys.stderr)
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except KeyboardInterrupt:
        last = latest_checkpoint(run_dir)
        where = f"the latest checkpoint is {last.name}" if last else "no checkpoint was written yet"
        print(f"stopped at step {trainer.state.global_step}: {where}", file=sys.stderr)
        raise

    records = read_metrics(run_dir / METRICS_FILE)
    if not any(r["step"] == trainer.state.global_step and "eval_loss" in r for r in records):
        trainer.evaluate()
        records = read_metrics(run_dir / METRICS_FILE)
    return output, records


def train(config: FinetuneConfig, *, callbacks: Sequence[TrainerCallback] = ()) -> RunResult:
    """Train, then write adapter/, config.yaml, metrics.jsonl, loss.png, samples.md, manifest.json."""
    started = time.monotonic()
    checkpoint = prepare_run_dir(config)
    run_dir = config.run_dir
    splits = load_dataset_dir(config.dataset)
    pin_dataset(run_dir, splits.sha256, resuming=checkpoint is not None)

    from finetune.estimate import check_fits, format_estimate, visible_gpu

    gpu = visible_gpu()
    fit = check_fits(config, gpu)
    save_config(config)

    from finetune.modeling import (
        QuantOptions,
        attach_new_adapter,
        load_base_model,
        load_tokenizer,
        save_adapter,
    )

    grounding = dataset_grounding(config.dataset)
    if grounding is None:
        print(
            "the dataset is not grounded: the adapter will learn the forum's voice, not to use "
            "its posts (build it with `python -m crawl dataset --context 3`)",
            file=sys.stderr,
        )
    tokenizer = load_tokenizer(config.model)
    lengths = drop_long_rows(tokenizer, splits.train, config.max_length)
    if not lengths.kept:
        raise UserError(
            f"every train row is longer than max_length={config.max_length} tokens "
            f"(the longest has {lengths.longest}): raise --max-length"
        )
    if lengths.dropped:
        print(
            f"{lengths.dropped} of {len(splits.train)} train rows are longer than "
            f"max_length={config.max_length} tokens and were left out (longest: {lengths.longest})",
            file=sys.stderr,
        )
    test_rows = splits.test[: config.eval_max_rows or None]
    eval_lengths = drop_long_rows(tokenizer, test_rows, config.max_length)
    if not eval_lengths.kept:
        raise UserError(f"every test row is longer than max_length={config.max_length}: raise it")

    device = training_device()
    quant = QuantOptions(
        load_in_4bit=config.load_in_4bit,
        quant_type=config.bnb_4bit_quant_type,
        double_quant=config.bnb_4bit_use_double_quant,
    )
    import torch
    from transformers import ProgressCallback, set_seed
    from trl import SFTTrainer

    from finetune.callbacks import ExtendedSchedule, LogLine, MetricsLog

    if fit is not None:
        print(format_estimate(*fit, gpu), file=sys.stderr)
    model = load_base_model(config.model, quant=quant, device=device)
    set_seed(config.seed)  # the LoRA A matrices are random: the seed makes a run repeatable
    model = attach_new_adapter(model, lora_config(config))
    trainer = SFTTrainer(
        model=model,
        args=sft_config(config, device),
        train_dataset=to_hf_dataset(lengths.kept),
        eval_dataset=to_hf_dataset(eval_lengths.kept),
        processing_class=tokenizer,
        callbacks=[MetricsLog(run_dir / METRICS_FILE), ExtendedSchedule(), *callbacks],
    )
    trainer.remove_callback(ProgressCallback)  # it prints raw dicts; LogLine prints lines
    trainer.add_callback(LogLine())
    if not device.startswith("cuda"):
        # trl casts a quantized model's LoRA weights to bf16 for the GPU; on CPU fp32 is
        # both exact and faster.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    output, records = train_to_the_end(trainer, run_dir, checkpoint)
    base_eval_loss = base_loss(trainer)
    if not trainer.is_world_process_zero():
        return RunResult(run_dir=run_dir, manifest={})

    save_adapter(trainer.model, run_dir / ADAPTER_DIR, tokenizer)
    if grounding is not None:
        write_grounding(run_dir / ADAPTER_DIR, grounding)
    plot_losses(
        records, run_dir / LOSS_PLOT_FILE, title=f"{Path(config.model).name} on {config.dataset}"
    )
    write_samples(
        trainer.model,
        tokenizer,
        distinct_questions(splits.test, config.num_samples),
        config,
        run_dir / SAMPLES_FILE,
    )
    manifest = {
        "base_model": config.model,
        "dataset": {
            "path": str(config.dataset),
            "sha256": splits.sha256,
            "train_rows": len(splits.train),
            "train_rows_used": len(lengths.kept),
            "train_rows_too_long": lengths.dropped,
            "eval_rows": len(eval_lengths.kept),
        },
        "grounding": asdict(grounding) if grounding else None,
        "steps": trainer.state.global_step,
        **launch_record(config, trainer),
        "resumed_from": checkpoint.name if checkpoint else None,
        "final_train_loss": _last(records, "loss"),
        "final_eval_loss": _last(records, "eval_loss"),
        "base_eval_loss": base_eval_loss,
        "runtime_seconds": round(time.monotonic() - started, 1),
        "train_runtime_seconds": round(output.metrics.get("train_runtime", 0.0), 1),
        "peak_memory": peak_memory(),
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "libraries": library_versions(),
    }
    write_json(run_dir / MANIFEST_FILE, manifest)
    final = manifest["final_eval_loss"]
    if final is not None:
        print(loss_verdict(base_eval_loss, final), flush=True)
    return RunResult(run_dir=run_dir, manifest=manifest)


def launch_record(config: FinetuneConfig, trainer: Any) -> dict[str, Any]:
    """How the run was launched, for the manifest: processes and rows per optimizer step."""
    processes = int(trainer.args.world_size)
    return {
        "processes": processes,
        "distributed": str(trainer.args.parallel_mode.value),
        "effective_batch_size": effective_batch(config, processes),
    }


def base_loss(trainer: Any) -> float:
    """The test split's loss with the adapter off: the number the run must beat.

    Logged as ``base_loss`` (not ``eval_loss``), so the loss plot keeps the adapter's curve.
    """
    with trainer.model.disable_adapter():  # nothing else runs on the model now
        return float(trainer.evaluate(metric_key_prefix="base")["base_loss"])
