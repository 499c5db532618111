"""A run records the grounding its dataset carried, beside the adapter, for serving and evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from crawl.layout import LAYOUT
from finetune.errors import UserError
from finetune.grounding import GROUNDING_FILE, Grounding, dataset_grounding, read_grounding
from tests.test_finetune_train import FIXTURE, tiny_config, train


def grounded_dataset(tmp_path: Path, k: int = 2) -> Path:
    out = tmp_path / "dataset"
    shutil.copytree(FIXTURE, out)
    context = {"k": k, "layout": LAYOUT, "distractors": 0.2}
    (out / "stats.json").write_text(json.dumps({"rows": 1, "context": context}))
    return out


def test_a_grounded_dataset_trains_an_adapter_that_says_so(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path / "run", "--max-steps", "1")
    config.dataset = str(grounded_dataset(tmp_path))
    result = train(config)
    assert read_grounding(result.run_dir / "adapter") == Grounding(layout=LAYOUT, k=2)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["grounding"] == {"layout": LAYOUT, "k": 2}


def test_plain_datasets_and_adapters_have_no_grounding(tmp_path):
    assert dataset_grounding(FIXTURE) is None
    assert read_grounding(tmp_path) is None
    (tmp_path / "stats.json").write_text(json.dumps({"context": None}))
    assert dataset_grounding(tmp_path) is None


def test_a_broken_grounding_record_is_one_line(tmp_path):
    (tmp_path / GROUNDING_FILE).write_text('{"layout": "x"}')
    with pytest.raises(UserError, match=r"is not a grounding record.*train the adapter again"):
        read_grounding(tmp_path)
