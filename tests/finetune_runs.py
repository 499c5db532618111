"""What the finetune tests share: a run cut down to seconds, and what trl must train on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "dataset"

# A shipped config's run, cut down to seconds on 2 cores: short rows, a loss every step,
# an evaluation and a checkpoint every 2 steps, a few short samples.
SHORT_RUN = (
    "--max-length",
    "128",
    "--logging-steps",
    "1",
    "--eval-steps",
    "2",
    "--save-steps",
    "2",
    "--eval-max-rows",
    "4",
    "--num-samples",
    "1",
    "--sample-max-new-tokens",
    "8",
)


def training_batch(model_dir: Path, rows: Sequence[dict[str, Any]], run_dir: Path) -> Any:
    """The batch a run's SFTTrainer (``finetune.train.sft_trainer``) builds from ``rows``."""
    from finetune.config import parse_config
    from finetune.data import to_hf_dataset
    from finetune.modeling import QuantOptions, load_base_model, load_tokenizer
    from finetune.train import sft_trainer

    config = parse_config(
        ["--model", str(model_dir), "--output-dir", str(run_dir), "--max-length", "512"]
    )
    tokenizer = load_tokenizer(model_dir)
    model = load_base_model(model_dir, quant=QuantOptions(load_in_4bit=False), device="cpu")
    dataset = to_hf_dataset(rows)
    trainer = sft_trainer(model, tokenizer, config, "cpu", dataset, dataset)
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])


def assert_trains_the_answer_and_its_end(
    tokenizer: Any, rows: Sequence[dict[str, Any]], batch: Any, end_id: int
) -> None:
    """Each row trains one span: its answer, then ``end_id``; the prompt and padding are -100."""
    for row, ids, labels in zip(rows, batch["input_ids"], batch["labels"], strict=True):
        ids, labels = ids.tolist(), labels.tolist()
        at = [i for i, label in enumerate(labels) if label != -100]
        assert at == list(range(at[0], at[-1] + 1)), "one trained span, nothing around it"
        trained = labels[at[0] : at[-1] + 1]
        assert trained == ids[at[0] : at[-1] + 1]
        assert end_id in trained
        assert tokenizer.pad_token_id not in trained, "padding is not trained"
        end = trained.index(end_id)
        assert tokenizer.decode(trained[:end]).strip() == row["completion"][0]["content"]
        assert tokenizer.decode(trained[end + 1 :]).strip() == "", "the turn ends the answer"
