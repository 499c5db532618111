"""`make demo` end to end: sample forum → crawl → dataset → tiny model → QLoRA → /compare path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bot.demo import QUESTIONS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(400)
def test_demo_runs_the_whole_pipeline_offline(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "bot.demo", "--workdir", str(tmp_path / "demo")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for step in range(1, 6):
        assert f"[{step}/5]" in out
    for question in QUESTIONS:
        assert f"Q: {question}" in out
    assert out.count("base: ") == len(QUESTIONS)
    assert out.count("finetuned: ") == len(QUESTIONS)
    run = tmp_path / "demo" / "run"
    for name in ("adapter/adapter_config.json", "loss.png", "samples.md", "manifest.json"):
        assert (run / name).is_file(), name
    assert "All done" in out
