"""Preference training: continue an SFT adapter with trl's ``DPOTrainer`` on community votes.

The frozen base is loaded once, 4-bit, exactly as for SFT. The SFT adapter is
loaded on it as the trainable adapter ``default``; trl 1.16's ``DPOTrainer``,
given a PEFT model and no ``ref_model``, then adds a second adapter ``ref``
with the same config and copies ``default``'s weights into it, frozen, and
computes the reference log-probs with ``ref`` active. So the reference is the
SFT adapter itself, and the only extra memory is a second copy of the small
LoRA matrices, not a second base model.

The run directory is an SFT run's: ``adapter/`` (the DPO adapter, ``ref``
removed, loadable by the bot as ``ADAPTER_PATH``), ``config.yaml``,
``metrics.jsonl`` (with trl's ``rewards/margins`` and ``rewards/accuracies``),
``loss.png``, ``samples.md`` (SFT vs DPO answers to held-out questions) and
``manifest.json`` naming the parent run and both adapters' weight hashes.
``--resume`` continues from the latest checkpoint as SFT does.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from finetune.chat import encode_conversation
from finetune.dpo_config import DpoConfig
from finetune.dpo_data import drop_long_pairs, load_preference_dir, to_preference_dataset
from finetune.errors import UserError
from finetune.fingerprint import adapter_weights_hash
from finetune.report import (
    LOSS_PLOT_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    SAMPLES_FILE,
    blockquote,
    library_versions,
    plot_losses,
    table_cell,
    write_json,
)
from finetune.run import (
    ADAPTER_DIR,
    FROZEN_ON_RESUME,
    RunResult,
    base_model,
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
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase, TrainerCallback

REFERENCE_ADAPTER_NAME = "ref"  # the name trl 1.16's DPOTrainer gives the frozen copy
DPO_FROZEN_ON_RESUME = (*FROZEN_ON_RESUME, "adapter", "beta", "loss_type")
DPO_LOGGED_KEYS = (
    "loss",
    "eval_loss",
    "rewards/margins",
    "eval_rewards/margins",
    "rewards/accuracies",
    "eval_rewards/accuracies",
    "learning_rate",
)


def dpo_arguments(config: DpoConfig, device: str) -> Any:
    """trl's DPOConfig: the SFT run's trainer arguments plus the preference loss."""
    from trl import DPOConfig

    return DPOConfig(
        **trainer_arguments(config, device),
        max_length=config.max_length,
        beta=config.beta,
        loss_type=[config.loss_type],
    )


def completion_logps(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompt: Sequence[dict[str, str]],
    completion: Sequence[dict[str, str]],
    adapter_name: str,
) -> float:
    """Summed log-probability of ``completion`` after ``prompt`` under one adapter.

    Scored with ``adapter_names`` (per-row adapter selection) so measuring
    the reference never switches the model's active adapter.
    """
    import torch

    prompt_ids = encode_conversation(tokenizer, prompt, add_generation_prompt=True)
    full_ids = encode_conversation(tokenizer, [*prompt, *completion])
    ids = torch.tensor([full_ids], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids, adapter_names=[adapter_name]).logits.float()
    logps = torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logps[len(prompt_ids) - 1 :].sum())


def preference_margins(
    model: Any, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, Any]], adapter: str
) -> list[float]:
    """log p(chosen) − log p(rejected) per row: what DPO pushes up."""
    model.eval()
    return [
        completion_logps(model, tokenizer, row["prompt"], row["chosen"], adapter)
        - completion_logps(model, tokenizer, row["prompt"], row["rejected"], adapter)
        for row in rows
    ]


def margin_report(sft: Sequence[float], dpo: Sequence[float]) -> dict[str, Any]:
    """How the held-out chosen-vs-rejected margin moved from the SFT adapter to the DPO one."""
    rows = len(sft)
    return {
        "rows": rows,
        "sft_mean": round(sum(sft) / rows, 4) if rows else None,
        "dpo_mean": round(sum(dpo) / rows, 4) if rows else None,
        "rows_improved": sum(d > s for s, d in zip(sft, dpo, strict=True)),
    }


def render_dpo_samples(samples: Sequence[dict[str, str]], title: str) -> str:
    parts = [
        f"# {title}\n",
        "Each question is from the preference test split; the community's pick is the "
        "answer its votes preferred. SFT and DPO answers are greedy.\n",
    ]
    for number, sample in enumerate(samples, start=1):
        question = sample["question"]
        heading = question.strip().splitlines()[0] if question.strip() else "(empty)"
        parts += [
            f"## {number}. {heading}\n",
            blockquote(question),
            "| Community's pick | SFT adapter | DPO adapter |",
            "| --- | --- | --- |",
            f"| {table_cell(sample['chosen'])} | {table_cell(sample['sft'])} | "
            f"{table_cell(sample['dpo'])} |\n",
        ]
    return "\n".join(parts)


def write_dpo_samples(
    model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], config: DpoConfig, path: Path
) -> Path:
    from finetune.generation import GenerationSettings, generate_texts
    from finetune.modeling import TRAINING_ADAPTER_NAME

    settings = GenerationSettings(max_new_tokens=config.sample_max_new_tokens)
    model.eval()
    prompts = [row["prompt"] for row in rows]
    answers = {
        name: generate_texts(
            model,
            tokenizer,
            prompts,
            settings,
            variants=["finetuned"] * len(rows),
            adapter_name=name,
        )
        if rows
        else []
        for name in (REFERENCE_ADAPTER_NAME, TRAINING_ADAPTER_NAME)
    }
    samples = [
        {
            "question": row["prompt"][-1]["content"],
            "chosen": row["chosen"][-1]["content"],
            "sft": sft,
            "dpo": dpo,
        }
        for row, sft, dpo in zip(
            rows, answers[REFERENCE_ADAPTER_NAME], answers[TRAINING_ADAPTER_NAME], strict=True
        )
    ]
    path.write_text(render_dpo_samples(samples, f"DPO samples: {config.model}"), encoding="utf-8")
    return path


def parent_run(adapter_dir: Path) -> dict[str, Any]:
    """What the DPO run continues: the adapter, its hash, and the SFT run's manifest if there is one."""
    run_dir = adapter_dir.resolve().parent
    manifest_path = run_dir / MANIFEST_FILE
    parent: dict[str, Any] = {
        "adapter": str(adapter_dir),
        "adapter_hash": adapter_weights_hash(adapter_dir),
        "run_dir": str(run_dir) if manifest_path.is_file() else None,
    }
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        parent["base_model"] = manifest.get("base_model")
        parent["dataset"] = (manifest.get("dataset") or {}).get("path")
    return parent


def adapters_base(config: DpoConfig) -> str:
    """The base ``config``'s adapter was trained on: the only one DPO may train it on.

    An adapter's weights mean nothing on another base: a config naming a
    different model (or a stale one, such as a shared config's example path)
    is refused rather than trained on the wrong base.
    """
    base = base_model(config.adapter_dir)
    if config.model is not None and not _same_model(config.model, base):
        raise UserError(
            f"model {config.model!r} is not the base {config.adapter_dir} was trained on "
            f"({base!r}): drop model from the config (DPO uses the adapter's base)"
        )
    return base


def _same_model(named: str, base: str) -> bool:
    """The same hub id, or the same local directory however it is spelled."""
    if named == base:
        return True
    named_path, base_path = Path(named).expanduser(), Path(base).expanduser()
    return (
        named_path.is_dir() and base_path.is_dir() and named_path.resolve() == base_path.resolve()
    )


def _tokenizer_source(adapter: Path, base: str) -> str:
    """The SFT adapter's tokenizer (its chat template is the one it was trained with)."""
    return str(adapter) if (adapter / "tokenizer_config.json").is_file() else base


def train_dpo(config: DpoConfig, *, callbacks: Sequence[TrainerCallback] = ()) -> RunResult:
    """Train, then write adapter/, config.yaml, metrics.jsonl, loss.png, samples.md, manifest.json."""
    started = time.monotonic()
    base = adapters_base(config)
    config = dataclasses.replace(config, model=base)  # the run's config.yaml names its base
    adapter_dir = config.adapter_dir
    splits = load_preference_dir(config.dataset, min_pairs=config.min_pairs)
    checkpoint = prepare_run_dir(config, frozen=DPO_FROZEN_ON_RESUME)
    run_dir = config.run_dir
    pin_dataset(run_dir, splits.sha256, resuming=checkpoint is not None)
    save_config(config)

    from finetune.modeling import (
        TRAINING_ADAPTER_NAME,
        load_adapter,
        load_base_model,
        load_tokenizer,
        save_adapter,
    )

    tokenizer = load_tokenizer(_tokenizer_source(adapter_dir, base))
    lengths = drop_long_pairs(tokenizer, splits.train, config.max_length)
    if len(lengths.kept) < config.min_pairs:
        raise UserError(
            f"only {len(lengths.kept)} train pairs fit max_length={config.max_length} tokens "
            f"(the longest has {lengths.longest}): raise --max-length"
        )
    if lengths.dropped:
        print(
            f"{lengths.dropped} of {len(splits.train)} train pairs are longer than "
            f"max_length={config.max_length} tokens and were left out",
            file=sys.stderr,
        )
    eval_rows = drop_long_pairs(
        tokenizer, splits.test[: config.eval_max_rows or None], config.max_length
    ).kept
    if not eval_rows:
        raise UserError(f"every test pair is longer than max_length={config.max_length}: raise it")

    device = training_device()
    from transformers import ProgressCallback, set_seed
    from trl import DPOTrainer

    from finetune.callbacks import ExtendedSchedule, LogLine, MetricsLog

    class DpoLogLine(LogLine):
        keys = DPO_LOGGED_KEYS

    set_seed(config.seed)
    frozen = load_base_model(base, quant=quant_options(config), device=device)
    model = load_adapter(frozen, adapter_dir, name=TRAINING_ADAPTER_NAME, trainable=True)
    trainer = DPOTrainer(
        model=model,
        args=dpo_arguments(config, device),
        train_dataset=to_preference_dataset(lengths.kept),
        eval_dataset=to_preference_dataset(eval_rows),
        processing_class=tokenizer,
        callbacks=[MetricsLog(run_dir / METRICS_FILE), ExtendedSchedule(), *callbacks],
    )
    # trl types trainer.model as any torch module; with peft_config it is the PeftModel made
    # from the adapter this run starts from.
    peft_model = cast("PeftModel", trainer.model)
    if REFERENCE_ADAPTER_NAME not in peft_model.peft_config:
        raise RuntimeError(
            "trl's DPOTrainer did not add its frozen 'ref' adapter: this trl version "
            "computes the reference another way; check finetune/dpo.py against it"
        )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(DpoLogLine())
    train_lora_in_fp32(peft_model, device, exact_copy=REFERENCE_ADAPTER_NAME)
    output, records = train_to_the_end(trainer, run_dir, checkpoint)
    if not trainer.is_world_process_zero():
        return RunResult(run_dir=run_dir, manifest={})

    margins = margin_report(
        preference_margins(peft_model, tokenizer, eval_rows, REFERENCE_ADAPTER_NAME),
        preference_margins(peft_model, tokenizer, eval_rows, TRAINING_ADAPTER_NAME),
    )
    write_dpo_samples(
        peft_model,
        tokenizer,
        distinct_questions(splits.test, config.num_samples),
        config,
        run_dir / SAMPLES_FILE,
    )
    peft_model.delete_adapter(REFERENCE_ADAPTER_NAME)  # the bot loads one adapter: the DPO one
    save_adapter(peft_model, run_dir / ADAPTER_DIR, tokenizer)
    plot_losses(
        records,
        run_dir / LOSS_PLOT_FILE,
        title=f"DPO: {Path(base).name} on {config.dataset}",
    )
    manifest = {
        "kind": "dpo",
        "base_model": base,
        "parent": parent_run(adapter_dir),
        "adapter_hash": adapter_weights_hash(run_dir / ADAPTER_DIR),
        "dataset": {
            "path": str(config.dataset),
            "sha256": splits.sha256,
            "train_pairs": len(splits.train),
            "train_pairs_used": len(lengths.kept),
            "train_pairs_too_long": lengths.dropped,
            "eval_pairs": len(eval_rows),
        },
        "beta": config.beta,
        "loss_type": config.loss_type,
        "steps": trainer.state.global_step,
        **launch_record(config, trainer),
        "resumed_from": checkpoint.name if checkpoint else None,
        "final_train_loss": last_value(records, "loss"),
        "final_eval_loss": last_value(records, "eval_loss"),
        "final_eval_reward_margin": last_value(records, "eval_rewards/margins"),
        "final_eval_reward_accuracy": last_value(records, "eval_rewards/accuracies"),
        "held_out_margin": margins,
        "runtime_seconds": round(time.monotonic() - started, 1),
        "train_runtime_seconds": round(output.metrics.get("train_runtime", 0.0), 1),
        "peak_memory": peak_memory(),
        "device": device_name(device),
        "libraries": library_versions(),
    }
    write_json(run_dir / MANIFEST_FILE, manifest)
    return RunResult(run_dir=run_dir, manifest=manifest)
