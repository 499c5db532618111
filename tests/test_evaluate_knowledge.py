"""``python -m finetune evaluate --knowledge``: the knowledge check of a run, on the tiny model.

The store is the bundled sample forum, crawled over loopback; the questions are
its shipped knowledge check. The tiny model's answers are noise, so the shares
that depend on the model are only checked for shape and order; retrieval is
real, so recall@k is checked for what the search must reach.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from crawl.crawler import CrawlOptions, crawl
from crawl.dataset import DatasetOptions, build_dataset
from crawl.fetcher import FetchOptions
from crawl.newschoolers import NewschoolersSite
from crawl.sample_site import SAMPLE_FORUM_DIR, serve_forum
from crawl.store import Store
from finetune.__main__ import main
from finetune.config import FinetuneConfig
from finetune.report import RESOLVED_CONFIG_FILE

pytestmark = pytest.mark.timeout(300)
KNOWLEDGE = SAMPLE_FORUM_DIR.parent / "knowledge.jsonl"
FAST = FetchOptions(concurrency=4, delay=0, timeout=5, max_tries=2, backoff=0.01)


async def crawl_sample_forum(db: Path) -> None:
    async with serve_forum(SAMPLE_FORUM_DIR) as base:
        options = CrawlOptions(forum_url=base + "/forum/1/Ski-Gabber", progress=False)
        with Store.open(db) as store:
            await crawl(NewschoolersSite(), store, options, FAST)


@pytest.fixture(scope="module")
def run_and_store(tiny_model_dir: Path, tiny_adapter_dir: Path, tmp_path_factory) -> tuple:
    """A run directory (the tiny model and its random adapter) on the crawled sample forum."""
    work = tmp_path_factory.mktemp("knowledge")
    db, dataset, run = work / "forum.sqlite", work / "dataset", work / "run"
    asyncio.run(crawl_sample_forum(db))
    build_dataset(db, dataset, DatasetOptions())
    run.mkdir()
    shutil.copytree(tiny_adapter_dir, run / "adapter")
    FinetuneConfig(
        model=str(tiny_model_dir),
        dataset=str(dataset),
        load_in_4bit=False,
        max_length=1024,
        per_device_train_batch_size=8,
    ).save(run / RESOLVED_CONFIG_FILE)
    return run, db


def test_evaluate_writes_the_knowledge_table(run_and_store, tmp_path, capsys):
    run, db = run_and_store
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"id": "wax", "kind": "short", "question": "Wax?"}]))
    argv = ["evaluate", "--run", str(run), "--knowledge", str(KNOWLEDGE), "--forum-db", str(db)]
    argv += ["--k", "3", "--questions", "0", "--prompts", str(prompts), "--max-new-tokens", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((run / "knowledge.json").read_text())
    questions = len(KNOWLEDGE.read_text().splitlines())
    assert report["questions"] == questions and len(report["answers"]) == 4 * questions
    shares = {row["label"]: row for row in report["shares"]}
    assert list(shares) == [
        "base, grounded",
        "base, not grounded",
        "finetuned, grounded",
        "finetuned, not grounded",
    ]
    for row in shares.values():
        assert row["questions"] == questions
        assert 0 <= row["stated"] <= row["reached"] <= 1
    for model in ("base", "finetuned"):
        grounded, alone = shares[f"{model}, grounded"], shares[f"{model}, not grounded"]
        assert grounded["recall"] >= 0.9 and alone["recall"] is None
        assert alone["reached"] == alone["stated"]  # nothing shown beside an ungrounded answer
        assert grounded["reached"] >= 0.5  # the excerpts carry the facts the noise cannot
    loss = report["loss"]
    assert loss["rows"] > 0
    assert loss["base_with_context"] != loss["base"] and loss["finetuned"] != loss["base"]
    markdown = (run / "knowledge.md").read_text()
    assert "| base, grounded |" in markdown and "Right thread in top 3" in markdown
    assert "| finetuned, not grounded |" in printed and "loss without → with 3 passages" in printed


def test_a_bad_knowledge_file_fails_before_the_model_loads(run_and_store, tmp_path, capsys):
    run, _ = run_and_store
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "facts": ["x"], "thread_id": "1"}\n{"question": "R?"}\n')
    assert main(["evaluate", "--run", str(run), "--knowledge", str(bad)]) != 0
    err = capsys.readouterr().err.strip()
    assert err == f"error: {bad}:2: missing 'facts'"


def test_a_grounded_rows_question_comes_back_without_its_context():
    from crawl.layout import render_question
    from crawl.search import Passage
    from finetune.evaluate import question_alone

    passage = Passage(
        post_id="2",
        thread_id="7",
        title="Wax",
        text="Blue wax below minus ten.",
        url="u",
        thread_url="t",
        author="ann",
        created=None,
        score=1.0,
        excerpt="Blue wax below minus ten.",
    )
    question = "Wax for cold days\n\nWhich wax?\n\nIt is minus 15 here."
    grounded = render_question(question, [passage])
    row = {"prompt": [{"role": "user", "content": grounded}], "completion": [], "post_id": "3"}
    assert grounded != question and question_alone(row)["prompt"][0]["content"] == question
    assert row["prompt"][0]["content"] == grounded  # the row itself is left as it was
