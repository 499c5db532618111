"""``python -m finetune dpo`` on the tiny model, CPU: from exported votes to a complete run directory.

The preference set is built the way the product builds it: answers and
votes in a feedback store, then ``feedback export``. One short run (resumed
once) serves every test in the module; 2 cores take about a minute.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.feedback.export import ExportOptions, export_feedback
from bot.feedback.records import AdapterRef, AnswerRecord
from bot.feedback.store import FeedbackStore
from finetune.__main__ import main as finetune_main
from finetune.fingerprint import adapter_weights_hash
from tests.finetune_runs import REPO, SHORT_RUN

pytestmark = pytest.mark.timeout(600)


GOOD = [
    "Use a warm wax and a structure brush.",
    "Wider skis float better in powder.",
    "Tune your edges to 88 degrees.",
]
BAD = ["I do not know anything.", "Skiing is a sport.", "Maybe ask someone else."]


def build_preferences(tmp: Path, pairs: int = 12, test_fraction: float = 0.25) -> Path:
    """``pairs`` voted /compare pairs in a store, exported; the community prefers GOOD."""
    db = tmp / f"feedback-{pairs}.sqlite"
    with FeedbackStore(db) as store:
        for i in range(pairs):
            conversation = [{"role": "user", "content": f"Question {i} about skis?"}]
            finetuned_wins = i % 3 != 0

            def answer(variant: str, good: bool, conversation=conversation, i=i) -> AnswerRecord:
                return AnswerRecord(
                    conversation=conversation,
                    text=(GOOD if good else BAD)[i % 3],
                    variant=variant,  # type: ignore[arg-type]
                    model="tiny",
                    source="discord",
                    adapter=AdapterRef("sft/adapter", "sft0000000000000"),
                )

            pair_id = store.record_pair(
                answer("base", not finetuned_wins), answer("finetuned", finetuned_wins)
            )
            for voter in range(2):
                store.vote_pair(
                    pair_id, f"discord:{voter}", "finetuned" if finetuned_wins else "base"
                )
    out = tmp / f"preferences-{pairs}"
    export_feedback(db, out, ExportOptions(test_fraction=test_fraction))
    return out


# The shipped config, which names no model, cut down to seconds; the adapter's base is a
# freshly built tiny model, not the config's example path, so DPO must find it from the adapter.
DPO_CONFIG = [
    "--config",
    str(REPO / "configs" / "dpo-tiny-cpu.yaml"),
    *SHORT_RUN,
    "--max-steps",
    "2",
]


@pytest.fixture(scope="module")
def dpo_run(tiny_adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("dpo")
    dataset = build_preferences(tmp)
    run_dir = tmp / "run-dpo"
    args = [
        "dpo",
        *DPO_CONFIG,
        "--adapter",
        str(tiny_adapter_dir),
        "--dataset",
        str(dataset),
        "--output-dir",
        str(run_dir),
    ]
    assert finetune_main(args) == 0
    first = json.loads((run_dir / "manifest.json").read_text())
    first_adapter = tmp / "adapter-after-2-steps"
    (run_dir / "adapter").rename(first_adapter)
    assert finetune_main([*args, "--resume", "--max-steps", "3"]) == 0
    return {
        "run_dir": run_dir,
        "dataset": dataset,
        "first_manifest": first,
        "first_adapter": first_adapter,
    }


def test_dpo_trains_on_the_base_its_adapter_was_trained_on(dpo_run: dict, tiny_model_dir):
    from finetune.dpo_config import DpoConfig
    from finetune.run import base_model

    manifest = json.loads((dpo_run["run_dir"] / "manifest.json").read_text())
    assert manifest["base_model"] == str(tiny_model_dir)
    assert DpoConfig.load(dpo_run["run_dir"] / "config.yaml").model == str(tiny_model_dir)
    # and what evaluate, merge and export read for the DPO run is that base too
    assert base_model(dpo_run["run_dir"] / "adapter") == str(tiny_model_dir)


def test_the_run_directory_is_complete_and_names_its_parent(dpo_run: dict, tiny_adapter_dir):
    run_dir: Path = dpo_run["run_dir"]
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "loss.png", "samples.md"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert not (run_dir / "adapter" / "ref").exists(), "the reference copy is not shipped"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["kind"] == "dpo"
    assert manifest["parent"]["adapter"] == str(tiny_adapter_dir)
    assert manifest["parent"]["adapter_hash"] == adapter_weights_hash(tiny_adapter_dir)
    assert manifest["adapter_hash"] == adapter_weights_hash(run_dir / "adapter")
    assert manifest["adapter_hash"] != manifest["parent"]["adapter_hash"]
    assert manifest["steps"] == 3 and manifest["resumed_from"] == "checkpoint-2"
    assert dpo_run["first_manifest"]["steps"] == 2
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margins" in r for r in records)
    assert any("eval_rewards/margins" in r for r in records)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    samples = (run_dir / "samples.md").read_text()
    assert "| Community's pick | SFT adapter | DPO adapter |" in samples
    assert GOOD[0] in samples or GOOD[1] in samples or GOOD[2] in samples


def test_dpo_moves_the_chosen_vs_rejected_margin_up(
    dpo_run: dict, tiny_model_dir, tiny_adapter_dir
):
    """Measured apart from trl: base + SFT adapter vs base + DPO adapter, on the train pairs."""
    from finetune.dpo import preference_margins
    from finetune.dpo_data import load_preference_dir
    from finetune.modeling import DEFAULT_ADAPTER_NAME, load_for_inference

    rows = load_preference_dir(dpo_run["dataset"]).train
    margins = {}
    for label, adapter in (("sft", tiny_adapter_dir), ("dpo", dpo_run["first_adapter"])):
        model, tokenizer = load_for_inference(tiny_model_dir, adapter, load_in_4bit=True)
        margins[label] = preference_margins(model, tokenizer, rows, DEFAULT_ADAPTER_NAME)
    improved = [d > s for s, d in zip(margins["sft"], margins["dpo"], strict=True)]
    assert all(improved), margins
    assert sum(margins["dpo"]) - sum(margins["sft"]) > 1.0
    held_out = dpo_run["first_manifest"]["held_out_margin"]
    assert held_out["dpo_mean"] > held_out["sft_mean"]
    assert dpo_run["first_manifest"]["final_eval_reward_margin"] > 0


def run_refused(args: list[str], capsys) -> str:
    assert finetune_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_a_model_other_than_the_adapters_base_is_refused(
    tiny_adapter_dir: Path, tiny_model_dir: Path, tmp_path: Path, capsys
):
    dataset = build_preferences(tmp_path, pairs=4)
    args = ["dpo", *DPO_CONFIG, "--adapter", str(tiny_adapter_dir), "--dataset", str(dataset)]
    err = run_refused(
        [*args, "--model", ".demo/tiny-model", "--output-dir", str(tmp_path / "r")], capsys
    )
    assert f"is not the base {tiny_adapter_dir} was trained on ('{tiny_model_dir}')" in err
    assert "drop model from the config" in err
    assert not (tmp_path / "r").exists()


def test_an_empty_or_unsplittable_preference_set_is_refused(
    tiny_adapter_dir: Path, tmp_path: Path, capsys
):
    empty = tmp_path / "empty"
    for split in ("train", "test"):
        (empty / split).mkdir(parents=True)
        (empty / split / "preferences.jsonl").write_text("")
    common = ["dpo", *DPO_CONFIG, "--adapter", str(tiny_adapter_dir)]
    err = run_refused(
        [*common, "--dataset", str(empty), "--output-dir", str(tmp_path / "r1")], capsys
    )
    assert "is empty" in err
    tiny = build_preferences(tmp_path, pairs=1, test_fraction=0.0)
    err = run_refused(
        [*common, "--dataset", str(tiny), "--output-dir", str(tmp_path / "r2")], capsys
    )
    assert "too small to split" in err
    err = run_refused(
        [*common[:-1], str(tmp_path), "--dataset", str(tiny), "--output-dir", str(tmp_path / "r3")],
        capsys,
    )
    assert "no adapter_config.json" in err
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
