"""``python -m finetune`` as it is, recording which rows each process trains on.

Run under ``accelerate launch … -m tests.ddp_probe RECORD_DIR <finetune args>``:
every training step appends this process's batch (each row's tokens, padding
removed) to ``RECORD_DIR/rank-<RANK>.jsonl``, then training goes on
unchanged. The multi-process test reads the files to check how the
Trainer split the dataset between processes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def record_batches(record_dir: Path) -> None:
    from transformers import Trainer

    out = record_dir / f"rank-{os.environ.get('RANK', '0')}.jsonl"
    train_step = Trainer.training_step

    def recording_step(self: Trainer, model: Any, inputs: dict[str, Any], *args: Any, **kw: Any):
        # SFT: one row per example; DPO: the chosen rows, then the rejected ones.
        ids, mask = inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()
        rows = [
            [t for t, keep in zip(r, m, strict=True) if keep]
            for r, m in zip(ids, mask, strict=True)
        ]
        with out.open("a", encoding="utf-8") as file:
            file.write(json.dumps({"step": self.state.global_step + 1, "rows": rows}) + "\n")
        return train_step(self, model, inputs, *args, **kw)

    Trainer.training_step = recording_step  # type: ignore[method-assign]


def main() -> int:
    record_dir, *argv = sys.argv[1:]
    record_batches(Path(record_dir))
    from finetune.__main__ import main as finetune_main

    return finetune_main(argv)


if __name__ == "__main__":
    sys.exit(main())
