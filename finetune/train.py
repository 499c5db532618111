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

Everything around the trainer — the run directory, the dataset pin, the
manifest's launch record, multi-process launches — is :mod:`finetune.run`'s,
shared with DPO.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.config import FinetuneConfig, LoraArguments
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
    render_samples,
    write_json,
)
from finetune.run import (
    ADAPTER_DIR,
    FROZEN_ON_RESUME,
    RunResult,
    device_name,
    distinct_questions,
    last_value,
    launch_record,
    peak_memory,
    pin_dataset,
    prepare_run_dir,
    quant_options,
    save_config,
    train_lora_in_fp32,
    train_to_the_end,
    trainer_arguments,
    training_device,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import TrainerCallback

SFT_FROZEN_ON_RESUME = (
    *FROZEN_ON_RESUME,
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_modules_to_save",
    "packing",
)


def lora_config(config: LoraArguments) -> Any:
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


def sft_trainer(
    model: Any,
    tokenizer: Any,
    config: FinetuneConfig,
    device: str,
    train_dataset: Dataset,
    eval_dataset: Dataset,
    callbacks: Sequence[TrainerCallback] = (),
) -> Any:
    """trl's SFTTrainer as a run builds it: the benchmarks time this trainer, not a lookalike."""
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=sft_config(config, device),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    train_lora_in_fp32(trainer.model, device)
    return trainer


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


def train(config: FinetuneConfig, *, callbacks: Sequence[TrainerCallback] = ()) -> RunResult:
    """Train, then write adapter/, config.yaml, metrics.jsonl, loss.png, samples.md, manifest.json."""
    started = time.monotonic()
    checkpoint = prepare_run_dir(config, SFT_FROZEN_ON_RESUME)
    run_dir = config.run_dir
    splits = load_dataset_dir(config.dataset)
    pin_dataset(run_dir, splits.sha256, resuming=checkpoint is not None)

    from finetune.estimate import check_fits, format_estimate, visible_gpu

    gpu = visible_gpu()
    fit = check_fits(config, gpu)
    save_config(config)

    from finetune.modeling import attach_new_adapter, load_base_model, load_tokenizer, save_adapter

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
    from transformers import ProgressCallback, set_seed

    from finetune.callbacks import ExtendedSchedule, LogLine, MetricsLog

    if fit is not None:
        print(format_estimate(*fit, gpu), file=sys.stderr)
    frozen = load_base_model(config.model, quant=quant_options(config), device=device)
    set_seed(config.seed)  # the LoRA A matrices are random: the seed makes a run repeatable
    model = attach_new_adapter(frozen, lora_config(config))
    trainer = sft_trainer(
        model,
        tokenizer,
        config,
        device,
        to_hf_dataset(lengths.kept),
        to_hf_dataset(eval_lengths.kept),
        callbacks=[MetricsLog(run_dir / METRICS_FILE), ExtendedSchedule(), *callbacks],
    )
    trainer.remove_callback(ProgressCallback)  # it prints raw dicts; LogLine prints lines
    trainer.add_callback(LogLine())
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
        "final_train_loss": last_value(records, "loss"),
        "final_eval_loss": last_value(records, "eval_loss"),
        "base_eval_loss": base_eval_loss,
        "runtime_seconds": round(time.monotonic() - started, 1),
        "train_runtime_seconds": round(output.metrics.get("train_runtime", 0.0), 1),
        "peak_memory": peak_memory(),
        "device": device_name(device),
        "libraries": library_versions(),
    }
    write_json(run_dir / MANIFEST_FILE, manifest)
    final = manifest["final_eval_loss"]
    if final is not None:
        print(loss_verdict(base_eval_loss, final), flush=True)
    return RunResult(run_dir=run_dir, manifest=manifest)


def base_loss(trainer: Any) -> float:
    """The test split's loss with the adapter off: the number the run must beat.

    Logged as ``base_loss`` (not ``eval_loss``), so the loss plot keeps the adapter's curve.
    """
    with trainer.model.disable_adapter():  # nothing else runs on the model now
        return float(trainer.evaluate(metric_key_prefix="base")["base_loss"])
