"""``benchmarks/gpu_check.py --dry-run``: the GPU check's whole path on CPU at a toy size, so it cannot rot.

Its numbers are not checked (a shared CPU says nothing about a GPU), only that
every phase ran and reported what it measured, with all packages and without
the ones a bare CUDA image lacks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]


def dry_run(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_check.py"),
            "--dry-run",
            "--scratch",
            str(tmp_path),
            *extra,
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_the_dry_run_measures_every_phase(tmp_path: Path):
    report, _ = dry_run(tmp_path)
    assert report["dry_run"] is True and "missing" not in report
    assert report["load"]["load_in_4bit"] is True and report["load"]["seconds"] > 0
    qlora = report["qlora"]
    assert qlora["config"] == "configs/mistral-7b-8gb.yaml"
    assert (qlora["lora_r"], qlora["gradient_accumulation_steps"]) == (2, 4)  # the 8 GB config's
    assert qlora["steps"] == 2 and qlora["tokens_per_s"] > 0
    serving = report["serving"]
    # every answer runs its full length, so the token counts are exact
    assert {users: row["tokens"] for users, row in serving["worker_by_users"].items()} == {
        "1": 8,
        "2": 16,
        "4": 32,
    }
    assert serving["generate_one_at_a_time"]["tokens"] == 2 * 8
    assert serving["speedup_at_most_users"] > 0
    assert not list(tmp_path.iterdir()), "the scratch checkpoint is removed"


def test_without_bitsandbytes_and_trl_it_says_how_to_bring_them_and_serves(tmp_path: Path):
    report, stderr = dry_run(
        tmp_path, "--without", "bitsandbytes,trl,datasets,prometheus_client,dotenv"
    )
    assert report["missing"] == ["bitsandbytes", "trl", "datasets"]
    assert report["shimmed"] == ["prometheus_client", "dotenv"]
    assert "pip download" in stderr and "--find-links wheels" in stderr
    assert "trl==" in stderr  # the locked version, so the wheel matches what the tests ran
    assert report["qlora"] == {"skipped": "needs bitsandbytes, datasets, trl"}
    assert report["load"]["load_in_4bit"] is False
    assert report["serving"]["worker_by_users"]["4"]["tokens"] == 32
