"""Training end to end on the tiny model on CPU: the run directory, resume, reload, evaluate, merge."""

import json
from pathlib import Path

import pytest

from finetune.config import FinetuneConfig, parse_config
from finetune.errors import UserError
from finetune.report import read_metrics
from tests.finetune_runs import FIXTURE, REPO, SHORT_RUN

RUN_FILES = (
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "adapter/tokenizer_config.json",
    "adapter/chat_template.jinja",
    "config.yaml",
    "manifest.json",
    "metrics.jsonl",
    "loss.png",
    "samples.md",
)


def tiny_config(model_dir: Path, run_dir: Path, *extra: str) -> FinetuneConfig:
    """The shipped tiny-cpu.yaml, cut down to a few seconds of training."""
    return parse_config(
        [
            "--config",
            str(REPO / "configs" / "tiny-cpu.yaml"),
            "--model",
            str(model_dir),
            "--dataset",
            str(FIXTURE),
            "--output-dir",
            str(run_dir),
            *SHORT_RUN,
            "--max-steps",
            "4",
            "--per-device-train-batch-size",
            "4",
            "--num-samples",
            "2",
            *extra,
        ]
    )


def train(config: FinetuneConfig, callbacks=()):
    from finetune.train import train as run_training

    return run_training(config, callbacks=callbacks)


def lora_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(adapter_dir / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    train(tiny_config(tiny_model_dir, run_dir))
    return run_dir


def test_run_directory_has_every_file(trained_run: Path):
    for name in RUN_FILES:
        assert (trained_run / name).is_file(), name
    assert sorted(p.name for p in (trained_run / "checkpoints").iterdir() if p.is_dir()) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    manifest = json.loads((trained_run / "manifest.json").read_text())
    assert manifest["steps"] == 4
    assert manifest["dataset"]["sha256"] and manifest["dataset"]["train_rows_too_long"] == 0
    assert manifest["libraries"]["trl"] and manifest["peak_memory"]["bytes"] > 0
    records = read_metrics(trained_run / "metrics.jsonl")
    assert manifest["final_train_loss"] == [r["loss"] for r in records if "loss" in r][-1]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    saved = FinetuneConfig.load(trained_run / "config.yaml")
    assert saved.max_steps == 4 and saved.run_dir == trained_run
    samples = (trained_run / "samples.md").read_text()
    assert samples.count("| Forum answer (ground truth) | Base model | Finetuned |") == 2


def test_saved_adapter_reloads_and_reproduces_the_samples(trained_run: Path, tiny_model_dir: Path):
    """samples.md was written by the in-memory model; the reloaded adapter must say the same."""
    from finetune.data import load_dataset_dir
    from finetune.generation import GenerationSettings, generate_texts
    from finetune.modeling import load_for_inference
    from finetune.report import table_cell

    assert any(
        t.abs().sum() > 0 for n, t in lora_tensors(trained_run / "adapter").items() if "lora_B" in n
    )
    model, tokenizer = load_for_inference(tiny_model_dir, trained_run / "adapter")
    question = load_dataset_dir(FIXTURE).test[0]["prompt"]
    settings = GenerationSettings(max_new_tokens=8)
    base, finetuned = generate_texts(
        model, tokenizer, [question, question], settings, variants=["base", "finetuned"]
    )
    assert (
        f"| {table_cell(base)} | {table_cell(finetuned)} |"
        in (trained_run / "samples.md").read_text()
    )


def test_an_existing_run_is_not_overwritten(trained_run: Path, tiny_model_dir: Path):
    from finetune.run import prepare_run_dir
    from finetune.train import SFT_FROZEN_ON_RESUME

    with pytest.raises(UserError, match="already holds a run: pass --resume"):
        prepare_run_dir(tiny_config(tiny_model_dir, trained_run), SFT_FROZEN_ON_RESUME)
    with pytest.raises(UserError, match="--resume cannot change lora_r"):
        prepare_run_dir(
            tiny_config(tiny_model_dir, trained_run, "--resume", "--lora-r", "4"),
            SFT_FROZEN_ON_RESUME,
        )
    with pytest.raises(UserError, match="nothing to resume"):
        prepare_run_dir(
            tiny_config(tiny_model_dir, trained_run.parent / "empty", "--resume"),
            SFT_FROZEN_ON_RESUME,
        )


def test_a_start_that_never_reached_a_checkpoint_can_start_again(
    tiny_model_dir: Path, tmp_path: Path
):
    """Stopped before checkpoint-1 (Ctrl-C, a model that would not load): config.yaml and an
    empty checkpoints/ are all there is. --resume says there is nothing to resume, so
    starting again without it must work, not send the operator back to --resume."""
    from finetune.run import prepare_run_dir
    from finetune.train import SFT_FROZEN_ON_RESUME

    run_dir = tmp_path / "false-start"
    config = tiny_config(tiny_model_dir, run_dir)
    assert prepare_run_dir(config, SFT_FROZEN_ON_RESUME) is None
    config.save(run_dir / "config.yaml")
    (run_dir / "checkpoints").mkdir()  # the Trainer creates it at once
    with pytest.raises(UserError, match="nothing to resume"):
        prepare_run_dir(tiny_config(tiny_model_dir, run_dir, "--resume"), SFT_FROZEN_ON_RESUME)
    assert prepare_run_dir(config, SFT_FROZEN_ON_RESUME) is None

    (run_dir / "adapter").mkdir()  # a finished run whose checkpoints were cleaned up
    with pytest.raises(UserError, match="already holds a run"):
        prepare_run_dir(config, SFT_FROZEN_ON_RESUME)


def test_the_same_run_twice_ends_bit_for_bit_the_same(
    trained_run: Path, tiny_model_dir: Path, tmp_path: Path
):
    """Training itself is deterministic here, so a resumed run that differs has a resume bug.

    Without this baseline a failing resume test cannot tell lost optimizer, RNG
    or data-order state from kernels that round differently from run to run.
    """
    run_dir = tmp_path / "again"
    train(tiny_config(tiny_model_dir, run_dir))
    again, first = lora_tensors(run_dir / "adapter"), lora_tensors(trained_run / "adapter")
    assert again.keys() == first.keys()
    for name, tensor in first.items():
        assert again[name].equal(tensor), name


def test_interrupted_run_resumes_from_its_checkpoint(
    trained_run: Path, tiny_model_dir: Path, tmp_path: Path
):
    """Killed after checkpoint-2, resumed: it ends where the uninterrupted run ended."""
    from transformers import TrainerCallback

    class InterruptAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    run_dir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_model_dir, run_dir), callbacks=[InterruptAtStep3()])
    assert not (run_dir / "manifest.json").exists()

    result = train(tiny_config(tiny_model_dir, run_dir, "--resume"))
    assert result.manifest["resumed_from"] == "checkpoint-2"
    assert result.manifest["steps"] == 4
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]  # step 3 of the killed run was dropped, not duplicated

    resumed, straight = lora_tensors(run_dir / "adapter"), lora_tensors(trained_run / "adapter")
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():  # same optimizer state, RNG and data order
        assert resumed[name].allclose(tensor, atol=1e-5), name

    # A larger --max-steps extends the run; its first new step must actually learn.
    train(tiny_config(tiny_model_dir, run_dir, "--resume", "--max-steps", "5", "--save-steps", "1"))
    before = lora_tensors(run_dir / "checkpoints" / "checkpoint-4")
    after = lora_tensors(run_dir / "checkpoints" / "checkpoint-5")
    assert any(not after[name].equal(before[name]) for name in before)


def test_loss_falls_when_overfitting_one_small_batch(tiny_model_dir: Path, tmp_path: Path):
    rows = (FIXTURE / "train.jsonl").read_text().splitlines()[:2]
    dataset = tmp_path / "two-rows"
    dataset.mkdir()
    (dataset / "train.jsonl").write_text("\n".join(rows) + "\n")
    (dataset / "test.jsonl").write_text(rows[0] + "\n")
    config = tiny_config(
        tiny_model_dir,
        tmp_path / "overfit",
        "--dataset",
        str(dataset),
        "--max-steps",
        "25",
        "--per-device-train-batch-size",
        "2",
        "--lr-scheduler-type",
        "constant",
        "--eval-steps",
        "25",
        "--save-steps",
        "25",
        "--num-samples",
        "0",
    )
    result = train(config)
    losses = [r["loss"] for r in read_metrics(config.run_dir / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 25
    assert losses[-1] < losses[0] - 0.5, losses
    assert result.manifest["final_eval_loss"] < losses[0]


def test_evaluate_and_merge(trained_run: Path, tmp_path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.evaluate import evaluate_run
    from finetune.merge import merge_run
    from finetune.modeling import QuantOptions, load_adapter, load_base_model

    prompts = tmp_path / "prompts.json"
    prompts.write_text(
        json.dumps(
            [
                {"id": "wax", "kind": "short", "question": "Which wax for slush?"},
                {"id": "capital", "kind": "off-topic", "question": "Capital of France?"},
            ]
        )
    )
    report = evaluate_run(trained_run, prompts=prompts, max_new_tokens=4)
    assert report.test_rows == len((FIXTURE / "test.jsonl").read_text().splitlines())
    assert report.base_loss > 0 and report.finetuned_loss > 0
    assert report.base_loss != report.finetuned_loss
    assert [a.id for a in report.answers] == ["wax", "capital"]
    saved = json.loads((trained_run / "evaluation.json").read_text())
    assert saved["finetuned_perplexity"] == pytest.approx(report.finetuned_perplexity)
    questions = {
        json.loads(line)["prompt"][-1]["content"] for line in (FIXTURE / "test.jsonl").open()
    }
    assert len(report.test_answers) == min(len(questions), 20)
    assert {a.question for a in report.test_answers} <= questions
    assert set(saved["test_answer_stats"]) == {"forum", "base", "finetuned"}
    assert saved["test_answer_stats"]["forum"]["answers"] == len(report.test_answers)
    assert saved["test_answer_stats"]["finetuned"]["ended_on_own"] <= len(report.test_answers)
    assert saved["verdict"].startswith("held-out loss ")
    markdown = (trained_run / "evaluation.md").read_text()
    assert "ROUGE-L F1 against the forum's answer" in markdown and saved["verdict"] in markdown

    merged_dir = merge_run(trained_run, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    config = FinetuneConfig.load(trained_run / "config.yaml")
    base = load_base_model(config.model, quant=QuantOptions(load_in_4bit=False), device="cpu")
    adapted = load_adapter(base, trained_run / "adapter")
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        assert merged(ids).logits.allclose(adapted(ids).logits, atol=1e-4)
    with pytest.raises(UserError, match="is not empty"):
        merge_run(trained_run, merged_dir)


def test_samples_use_each_question_once():
    from finetune.run import distinct_questions

    def row(question: str, answer: str) -> dict:
        return {
            "prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": answer}],
        }

    rows = [row("q1", "a"), row("q1", "b"), row("q2", "c"), row("q3", "d")]
    assert [r["completion"][0]["content"] for r in distinct_questions(rows, 2)] == ["a", "c"]
    assert len(distinct_questions(rows, 10)) == 3


@pytest.mark.parametrize("kind", ["file", "non-empty directory"])
def test_merge_refuses_an_existing_out_in_one_line(trained_run: Path, tmp_path: Path, kind: str):
    from finetune.errors import UserError
    from finetune.merge import merge_run

    out = tmp_path / "out"
    if kind == "file":
        out.write_text("keep me")
    else:
        out.mkdir()
        (out / "model.safetensors").write_text("keep me")
    with pytest.raises(UserError, match="is not empty or not a directory"):
        merge_run(trained_run, out)


def test_resume_refuses_a_different_dataset(
    trained_run: Path, tiny_model_dir: Path, tmp_path: Path
):
    import shutil

    run = shutil.copytree(trained_run, tmp_path / "run")
    changed = shutil.copytree(FIXTURE, tmp_path / "dataset")
    rows = (changed / "train.jsonl").read_text().splitlines()
    (changed / "train.jsonl").write_text("\n".join(reversed(rows)) + "\n")  # same rows, new order
    config = tiny_config(tiny_model_dir, run, "--resume", "--dataset", str(changed))
    with pytest.raises(UserError, match="--resume with different data"):
        train(config)
    assert (run / "dataset.sha256").read_text().strip() != ""


def test_a_run_names_its_base_through_one_function(tmp_path: Path):
    """DPO, evaluate, merge and export all ask ``base_model``: the run's config, else peft's record."""
    from finetune.run import base_model

    adapter = tmp_path / "loose" / "adapter"
    adapter.mkdir(parents=True)
    with pytest.raises(UserError, match=r"no adapter_config\.json"):
        base_model(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "hub/a"}))
    assert base_model(adapter) == "hub/a"
    (adapter.parent / "config.yaml").write_text("model: /models/b\n")
    assert base_model(adapter) == "/models/b"
