"""The benchmarks' forums: render one of the shipped ``threads.yaml``, serve it, crawl it.

A forum is crawled the way an operator crawls one (``crawl serve-sample`` on
loopback, ``crawl fetch``, which keeps the search index), so what a benchmark
measures is what the product does.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, quiet: bool = False) -> None:
    """``python -m ARGS`` in the checkout, as an operator types it; stops the benchmark on failure."""
    if not quiet:
        print("$ python -m " + " ".join(args), flush=True)
    output = subprocess.DEVNULL if quiet else None
    subprocess.run([sys.executable, "-m", *args], cwd=REPO, check=True, stdout=output)


def crawl_forum(threads_yaml: Path, work: Path, *, quiet: bool = False) -> Path:
    """A freshly crawled and indexed store (``work/forum.sqlite``) of the forum ``threads_yaml`` renders."""
    site, db = work / "site", work / "forum.sqlite"
    run("crawl.sample_render", str(threads_yaml), str(site), quiet=quiet)
    server = subprocess.Popen(
        [sys.executable, "-m", "crawl", "serve-sample", "--dir", str(site), "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().split()[-1]
        run("crawl", "fetch", "--forum-url", url, "--db", str(db), "--delay", "0", quiet=quiet)
    finally:
        server.terminate()
        server.wait(timeout=10)
    return db
