"""A real forum store for the serving tests: the bundled sample forum, crawled on loopback.

Built the way an operator builds one (``python -m crawl serve-sample`` and
``crawl fetch``), so grounding is tested against the index ``fetch`` keeps,
not a hand-made table.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def crawl_sample_forum(db: Path) -> Path:
    """Serve the sample forum on 127.0.0.1, crawl it into ``db`` with no delay; returns ``db``."""
    server = subprocess.Popen(
        [sys.executable, "-m", "crawl", "serve-sample", "--port", "0"],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = server.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("serving sample forum at http://127.0.0.1:"), line
        forum_url = line.split(" at ", 1)[1].strip()
        # A process of its own: the fixture may be first asked for inside a running event loop.
        argv = ["fetch", "--forum-url", forum_url, "--db", str(db), "--delay", "0"]
        crawl = subprocess.run(
            [sys.executable, "-m", "crawl", *argv], cwd=REPO, capture_output=True, text=True
        )
        assert crawl.returncode == 0, crawl.stderr[-2000:]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)
    return db
