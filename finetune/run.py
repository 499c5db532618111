"""The run directory both trainers write, and what every command reads back from it.

SFT (:mod:`finetune.train`) and DPO (:mod:`finetune.dpo`) differ in their
trainer and their data; everything around the trainer is here, once: the
directory that refuses to be overwritten, the dataset pinned for ``--resume``,
the trainer arguments, the CPU precision of the LoRA weights, the last-step
evaluation and the launch record of the manifest. The benchmarks call the same
functions, so they measure what a run does.

A run owns its base model: :func:`base_model` is how DPO, ``evaluate``,
``merge`` and ``export`` find it, so none of them trains or loads an adapter
on a base it was not trained on.

Under ``accelerate launch --num_processes N`` every process trains (DDP) and
checks the run directory, but only the main one writes it, so the run reads as
one run.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from finetune.errors import UserError
from finetune.report import MANIFEST_FILE, METRICS_FILE, RESOLVED_CONFIG_FILE, read_metrics

if TYPE_CHECKING:
    from finetune.config import ModelArguments, TrainingArguments

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
DATASET_HASH_FILE = "dataset.sha256"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft's; it names the base it was trained on

# Changing any of these between a run and its resumption would train a different model
# (or feed a different data order) under the same run directory. A trainer adds its own.
FROZEN_ON_RESUME = (
    "model",
    "load_in_4bit",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "seed",
)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    manifest: dict[str, Any]


def require_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` as a path, after checking it holds a finetune run (its resolved config)."""
    run = Path(run_dir).expanduser()
    if not (run / RESOLVED_CONFIG_FILE).is_file():
        raise UserError(f"{run} is not a run directory (no {RESOLVED_CONFIG_FILE})")
    return run


def base_model(adapter_dir: str | Path) -> str:
    """The base model ``adapter_dir`` was trained on: its run's config, else peft's record.

    A run's resolved ``config.yaml`` names the base exactly as it was loaded; an
    adapter outside a run still carries peft's ``base_model_name_or_path``.
    """
    adapter = Path(adapter_dir).expanduser()
    run_config = adapter.parent / RESOLVED_CONFIG_FILE
    if run_config.is_file():
        values = yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}
        model = values.get("model") if isinstance(values, dict) else None
        if isinstance(model, str) and model:
            return model
        raise UserError(f"{run_config} names no model: it is not a finetune run's config")
    peft_config = adapter / ADAPTER_CONFIG_FILE
    if not peft_config.is_file():
        raise UserError(
            f"{adapter}: no {ADAPTER_CONFIG_FILE} there; point at a run's {ADAPTER_DIR}/ directory"
        )
    model = json.loads(peft_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not model:
        raise UserError(f"{peft_config} does not name the base model the adapter was trained on")
    return str(model)


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


def effective_batch(config: TrainingArguments, processes: int) -> int:
    """Rows per optimizer step: per-device batch × accumulation × processes."""
    return config.per_device_train_batch_size * config.gradient_accumulation_steps * processes


def latest_checkpoint(run_dir: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return None
    found = get_last_checkpoint(str(folder))
    return Path(found) if found else None


def prepare_run_dir(config: Any, frozen: Sequence[str]) -> Path | None:
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


def save_config(config: Any) -> None:
    """The run's resolved config.yaml, written by the main process only."""
    if is_main_process():
        write_atomically(config.run_dir / RESOLVED_CONFIG_FILE, config.to_yaml())


def quant_options(config: ModelArguments) -> Any:
    """How the frozen base is loaded, the same for every trainer of a run."""
    from finetune.modeling import QuantOptions

    return QuantOptions(
        load_in_4bit=config.load_in_4bit,
        quant_type=config.bnb_4bit_quant_type,
        double_quant=config.bnb_4bit_use_double_quant,
    )


def trainer_arguments(config: TrainingArguments, device: str) -> dict[str, Any]:
    """The Trainer arguments every trl trainer of a run shares; precision follows the device."""
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


def train_lora_in_fp32(model: Any, device: str, *, exact_copy: str | None = None) -> None:
    """On CPU, train the LoRA weights in fp32: trl rounds them to bf16, which is for the GPU.

    fp32 is exact and, without AVX512-BF16, faster. ``exact_copy`` names an
    adapter holding the unrounded weights (DPO's frozen ``ref``, a copy of the
    SFT adapter): each trainable weight is restored from it, so the policy
    starts exactly at the reference.
    """
    if device.startswith("cuda"):
        return
    from finetune.modeling import TRAINING_ADAPTER_NAME

    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if exact_copy is None:
            param.data = param.data.float()
            continue
        source = name.replace(f".{TRAINING_ADAPTER_NAME}.", f".{exact_copy}.")
        if source != name:
            param.data = model.get_parameter(source).data.detach().clone().float()
        else:  # not an adapter weight: nothing holds an exact copy
            param.data = param.data.float()


def train_to_the_end(
    trainer: Any, run_dir: Path, checkpoint: Path | None
) -> tuple[Any, list[dict[str, Any]]]:
    """Run ``trainer`` (from ``checkpoint`` when resuming) and make sure the last step is evaluated.

    Both trainers say the same on Ctrl-C — where the run can be resumed from —
    and both end with the final step's eval loss in the metrics, which the
    report and the verdict read.
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


def last_value(records: Sequence[dict[str, Any]], key: str) -> float | None:
    """The last logged value of ``key`` (a metric), or None if it was never logged."""
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def peak_memory() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {"bytes": int(torch.cuda.max_memory_allocated()), "kind": "cuda max allocated"}
    # ru_maxrss is KiB on Linux
    return {
        "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "kind": "cpu peak resident set",
    }


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"


def launch_record(config: TrainingArguments, trainer: Any) -> dict[str, Any]:
    """How the run was launched, for the manifest: processes and rows per optimizer step."""
    processes = int(trainer.args.world_size)
    return {
        "processes": processes,
        "distributed": str(trainer.args.parallel_mode.value),
        "effective_batch_size": effective_batch(config, processes),
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
