"""The dataset directory: strict row checks, long rows counted, and what trl trains on."""

import json
import shutil
from pathlib import Path

import pytest

from finetune.data import drop_long_rows, load_dataset_dir, read_rows, token_length
from finetune.errors import UserError
from finetune.modeling import load_tokenizer
from tests.finetune_runs import assert_trains_the_answer_and_its_end, training_batch

FIXTURE = Path(__file__).parent / "fixtures" / "dataset"
GOOD = {
    "prompt": [{"role": "user", "content": "Wax?\n\nWhich wax for slush?"}],
    "completion": [{"role": "assistant", "content": "Warm wax."}],
}


def test_fixture_dataset_loads_with_a_stable_hash():
    splits = load_dataset_dir(FIXTURE)
    assert len(splits.train) > len(splits.test) > 0
    assert splits.sha256 == load_dataset_dir(FIXTURE).sha256
    assert len(splits.sha256) == 64


def test_hash_changes_with_the_data(tmp_path: Path):
    copy = tmp_path / "dataset"
    shutil.copytree(FIXTURE, copy)
    with (copy / "test.jsonl").open("a") as out:
        out.write(json.dumps(GOOD) + "\n")
    assert load_dataset_dir(copy).sha256 != load_dataset_dir(FIXTURE).sha256


@pytest.mark.parametrize(
    "line, expected",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"prompt": GOOD["prompt"]}), "needs 'prompt' and 'completion'"),
        (json.dumps({**GOOD, "prompt": "text"}), "'prompt' must be a non-empty list"),
        (
            json.dumps({**GOOD, "completion": [{"role": "user", "content": "x"}]}),
            "the completion must be assistant messages",
        ),
        (
            json.dumps({**GOOD, "prompt": [{"role": "assistant", "content": "x"}]}),
            "the prompt must end with a user message",
        ),
        (
            json.dumps({**GOOD, "completion": [{"role": "assistant", "content": "  "}]}),
            "empty content",
        ),
        (json.dumps({**GOOD, "prompt": [{"role": "user"}]}), "needs a 'role' and a 'content'"),
    ],
)
def test_bad_rows_name_the_file_and_line(tmp_path: Path, line: str, expected: str):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    with pytest.raises(UserError) as info:
        read_rows(path)
    assert f"{path}:3:" in str(info.value)
    assert expected in str(info.value)


def test_missing_and_empty_files(tmp_path: Path):
    with pytest.raises(UserError, match="not found"):
        load_dataset_dir(tmp_path / "nowhere")
    (tmp_path / "train.jsonl").write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(UserError, match=r"test\.jsonl not found"):
        load_dataset_dir(tmp_path)
    (tmp_path / "test.jsonl").write_text("\n")
    with pytest.raises(UserError, match="has no rows"):
        load_dataset_dir(tmp_path)


def test_long_rows_are_counted_not_truncated(tiny_model_dir: Path):
    tokenizer = load_tokenizer(tiny_model_dir)
    rows = load_dataset_dir(FIXTURE).train
    lengths = sorted(token_length(tokenizer, row) for row in rows)
    limit = lengths[len(lengths) // 2]
    result = drop_long_rows(tokenizer, rows, limit)
    assert result.dropped == sum(n > limit for n in lengths) > 0
    assert result.longest == lengths[-1]
    assert all(token_length(tokenizer, row) <= limit for row in result.kept)


def test_labels_cover_the_completion_and_its_eos_only(tiny_model_dir: Path, tmp_path: Path):
    """What trl actually feeds the model: prompt tokens are -100, the answer and EOS are trained."""
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id, "padding with EOS would mask it out"
    rows = load_dataset_dir(FIXTURE).train[:2]
    batch = training_batch(tiny_model_dir, rows, tmp_path)
    assert_trains_the_answer_and_its_end(tokenizer, rows, batch, tokenizer.eos_token_id)
    for ids in batch["input_ids"].tolist():  # the template's BOS, once: never a second
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
