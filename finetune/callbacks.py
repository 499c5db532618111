"""Trainer callbacks of a run: its metrics file, its log lines and the resumed schedule.

Imported only once training starts (it pulls in transformers), so that config
and dataset errors are reported before the slow imports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import ProgressCallback, TrainerCallback

if TYPE_CHECKING:
    from torch.optim import Optimizer
    from transformers import TrainerControl, TrainerState, TrainingArguments

from finetune.report import read_metrics

LOGGED_KEYS = (
    "loss",
    "eval_loss",
    "base_loss",
    "learning_rate",
    "grad_norm",
    "mean_token_accuracy",
)


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record) + "\n"


class MetricsLog(TrainerCallback):
    """Append every log record to ``metrics.jsonl``.

    A resumed run first drops the records written after its checkpoint (an
    interrupted run may have logged steps it then lost), so the file stays one
    consistent history for ``loss.png``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            kept = [r for r in read_metrics(self.path) if r["step"] <= state.global_step]
            self.path.write_text("".join(map(_json_line, kept)), encoding="utf-8")

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a", encoding="utf-8") as out:
                out.write(_json_line(record))


class LogLine(ProgressCallback):
    """The training bar, and one readable line per logging step instead of a raw dict.

    Evaluation draws no bar of its own: a second bar nested under the first
    leaves cursor-movement debris in logs, and its result is a line anyway.
    """

    def on_prediction_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        eval_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        return

    keys: tuple[str, ...] = LOGGED_KEYS

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        fields = [f"{key} {logs[key]:.4g}" for key in self.keys if key in logs]
        if fields:
            self.training_bar.write(
                f"step {state.global_step}/{state.max_steps}  " + "  ".join(fields)
            )


class ExtendedSchedule(TrainerCallback):
    """Make the first resumed step use the rebuilt schedule's learning rate.

    The optimizer's saved state carries the learning rate of the step before
    the checkpoint. When ``--max-steps`` grew, that is the *old* schedule's end
    (0 for linear or cosine decay) and the first resumed step would be wasted.
    The scheduler is rebuilt for the new total, so its value at the resumed
    step is the right one. Same ``--max-steps``: both agree and nothing changes.
    """

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Optimizer | None = None,
        lr_scheduler: Any = None,  # torch's LambdaLR, or accelerate's wrapper of it
        **kwargs: Any,
    ) -> None:
        if state.global_step == 0 or optimizer is None or lr_scheduler is None:
            return
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
        factors = getattr(scheduler, "lr_lambdas", None)
        if factors is None:
            return
        for group, base_lr, factor in zip(
            optimizer.param_groups, scheduler.base_lrs, factors, strict=True
        ):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
