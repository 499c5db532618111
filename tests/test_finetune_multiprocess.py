"""Two training processes (``accelerate launch --num_processes 2``, DDP over gloo) on the tiny model.

SFT: 24 train rows, 4 per process per step, so one epoch is 3 steps. The run
trains 2 steps, is resumed under the same launch to 4, and must end as one
run: each step logged once, the adapter and report written once, the
manifest saying 2 processes and 8 rows per step, and no row trained twice in
the first epoch (the Trainer's sampler shards each global batch between the
processes; the resume continues its order). DPO trains one epoch of votes
(2 steps) the same way; its resume is the same code as SFT's.
Both launches go through ``tests/ddp_probe.py``, which runs ``python -m
finetune`` unchanged and records each process's batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from finetune.__main__ import main as finetune_main
from finetune.dpo_data import load_preference_dir
from finetune.report import read_metrics
from tests.finetune_runs import FIXTURE, REPO, SHORT_RUN
from tests.test_finetune_dpo import build_preferences

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROCESSES = 2
PER_DEVICE = 4


def launch(workdir: Path, record: Path, *finetune_args: str) -> subprocess.CompletedProcess[str]:
    """``accelerate launch --multi_gpu --num_processes 2 -m tests.ddp_probe RECORD <finetune args>``."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        # accelerate 1.15's --cpu runs ONE process (its simple launcher; several CPU
        # processes need mpirun). --multi_gpu starts them with torch's elastic launcher;
        # with no GPU visible the Trainer trains on CPU over gloo.
        "--multi_gpu",
        "--num_processes",
        str(PROCESSES),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "tests.ddp_probe",
        str(record),
        *finetune_args,
    ]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def batches(record: Path) -> dict[int, dict[int, list[tuple[int, ...]]]]:
    """step → rank → the rows that process trained on at that step."""
    seen: dict[int, dict[int, list[tuple[int, ...]]]] = {}
    for rank in range(PROCESSES):
        for line in (record / f"rank-{rank}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            seen.setdefault(entry["step"], {})[rank] = [tuple(r) for r in entry["rows"]]
    return seen


def assert_one_epoch_split(record: Path, rows: int, steps: int, epoch_steps: int) -> None:
    """Each step: both processes, disjoint rows; the first epoch: every row exactly once."""
    seen = batches(record)
    assert sorted(seen) == list(range(1, steps + 1))
    for step, by_rank in seen.items():
        assert sorted(by_rank) == list(range(PROCESSES)), f"step {step} ran on {sorted(by_rank)}"
        assert not set(by_rank[0]) & set(by_rank[1]), f"step {step}: both processes got a row"
    epoch = [
        row for step in range(1, epoch_steps + 1) for rows_ in seen[step].values() for row in rows_
    ]
    assert len(epoch) == rows
    assert Counter(epoch).most_common(1)[0][1] == 1, "a row was trained twice in one epoch"


def assert_logged_once(run_dir: Path, key: str, steps: list[int]) -> None:
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if key in r] == steps


def test_sft_with_two_processes_trains_resumes_and_writes_one_run(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run_dir, record = tmp_path / "run", tmp_path / "batches"
    record.mkdir()
    args = [
        "--config",
        str(REPO / "configs" / "tiny-cpu.yaml"),
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(FIXTURE),
        "--output-dir",
        str(run_dir),
        *SHORT_RUN,
        "--per-device-train-batch-size",
        str(PER_DEVICE),
    ]
    first = launch(tmp_path, record, *args, "--max-steps", "2")
    assert first.stdout.count("run written to") == 1  # the main process reports, alone
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["processes"] == PROCESSES
    assert manifest["effective_batch_size"] == PROCESSES * PER_DEVICE
    assert manifest["steps"] == 2 and manifest["resumed_from"] is None

    launch(tmp_path, record, *args, "--max-steps", "4", "--resume")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["steps"] == 4 and manifest["resumed_from"] == "checkpoint-2"
    assert manifest["processes"] == PROCESSES
    assert_logged_once(run_dir, "loss", [1, 2, 3, 4])
    assert_logged_once(run_dir, "eval_loss", [2, 4])
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "samples.md").read_text().count("| Forum answer (ground truth) |") == 1
    assert sorted(
        p.name for p in (run_dir / "checkpoints" / "checkpoint-4").glob("rng_state*")
    ) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]
    assert not list(run_dir.glob(".*.tmp"))

    # One process cannot continue what two started: the effective batch would halve.
    assert finetune_main([*args, "--max-steps", "6", "--resume"]) == 2
    assert "was trained by 2: resume it as it was started" in capsys.readouterr().err

    rows = len((FIXTURE / "train.jsonl").read_text().splitlines())
    assert rows == 3 * PROCESSES * PER_DEVICE  # a whole number of steps: no padded last step
    assert_one_epoch_split(record, rows, steps=4, epoch_steps=3)


def test_dpo_with_two_processes_splits_the_pairs_and_writes_one_run(
    tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path: Path
):
    dataset = build_preferences(tmp_path, pairs=18, test_fraction=0.1)
    pairs = len(load_preference_dir(dataset).train)
    assert pairs == 2 * PROCESSES * PER_DEVICE  # one epoch is 2 steps
    run_dir, record = tmp_path / "run-dpo", tmp_path / "batches"
    record.mkdir()
    args = [
        "dpo",
        "--config",
        str(REPO / "configs" / "dpo-tiny-cpu.yaml"),
        "--adapter",
        str(tiny_adapter_dir),
        "--dataset",
        str(dataset),
        "--output-dir",
        str(run_dir),
        *SHORT_RUN,
        "--per-device-train-batch-size",
        str(PER_DEVICE),
    ]
    done = launch(tmp_path, record, *args, "--max-steps", "2")
    assert done.stdout.count("DPO run written to") == 1
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["kind"] == "dpo" and manifest["processes"] == PROCESSES
    assert manifest["effective_batch_size"] == PROCESSES * PER_DEVICE
    assert manifest["steps"] == 2
    assert_logged_once(run_dir, "loss", [1, 2])
    assert_logged_once(run_dir, "eval_loss", [2])
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    # each pair is a chosen and a rejected row in the batch; the epoch sees each once
    assert_one_epoch_split(record, 2 * pairs, steps=2, epoch_steps=2)
