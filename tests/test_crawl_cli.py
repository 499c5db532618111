"""``python -m crawl`` as an operator runs it: the demo path, and failures as one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crawl.__main__ import main
from crawl.errors import EXIT_USER_ERROR
from tests.forum_store import serve_sample

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SAMPLE_FORUM = REPO / "crawl" / "sample_forum" / "threads.yaml"
THREAD_700003 = "forum/thread/700003/Park-skis-in-powder---too-soft-"


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["crawl-everything"], "invalid choice: 'crawl-everything'"),
        (["fetch"], "the following arguments are required: --db"),
        (["fetch", "--db", "x.sqlite", "--concurrency", "0"], "--concurrency: 0 is not at least 1"),
        (["fetch", "--db", "x.sqlite", "--delay", "-1"], "--delay: -1 is negative"),
        (["dataset", "--db", "x", "--out", "y", "--test-fraction", "1.5"], "1.5 is not in [0, 1)"),
        (["dataset", "--db", "x", "--out", "y", "--copypasta-threads", "1"], "give 2 or more"),
        (["check"], "the following arguments are required: URL_OR_FILE"),
    ],
)
def test_usage_mistakes_are_one_line(capsys, argv, says):
    assert says in one_line_error(capsys, argv)


def test_user_agent_comes_from_crawl_user_agent_unless_given(monkeypatch):
    """README and .env.example tell operators to set CRAWL_USER_AGENT: it must be obeyed."""
    from crawl.__main__ import build_parser
    from crawl.fetcher import DEFAULT_USER_AGENT

    monkeypatch.setenv("CRAWL_USER_AGENT", "")  # set, even empty: a .env cannot override it
    assert build_parser().parse_args(["fetch", "--db", "f"]).user_agent == DEFAULT_USER_AGENT
    monkeypatch.setenv("CRAWL_USER_AGENT", "SkiShop/1.0 (+mailto:ops@example.org)")
    assert build_parser().parse_args(["fetch", "--db", "f"]).user_agent.startswith("SkiShop/1.0")
    given = ["fetch", "--db", "f", "--user-agent", "Mine/2"]
    assert build_parser().parse_args(given).user_agent == "Mine/2"


def test_fetch_errors_are_one_line(capsys, tmp_path):
    db = str(tmp_path / "f.sqlite")
    err = one_line_error(
        capsys, ["fetch", "--db", db, "--forum-url", "ftp://example.org/forum/1/x"]
    )
    assert "is not a forum listing URL" in err
    err = one_line_error(capsys, ["fetch", "--db", str(tmp_path / "no/such/dir/f.sqlite")])
    assert "does not exist" in err
    # Nothing listens on port 9 of the loopback: robots.txt cannot be read.
    err = one_line_error(
        capsys,
        [
            "fetch",
            "--db",
            db,
            "--forum-url",
            "http://127.0.0.1:9/forum/1/Ski-Gabber",
            "--max-tries",
            "1",
        ],
    )
    assert "cannot read http://127.0.0.1:9/robots.txt" in err


def test_dataset_errors_are_one_line(capsys, tmp_path):
    err = one_line_error(
        capsys, ["dataset", "--db", str(tmp_path / "none.sqlite"), "--out", str(tmp_path)]
    )
    assert "no forum store at" in err and "python -m crawl fetch" in err
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database, just bytes" * 100)
    err = one_line_error(capsys, ["dataset", "--db", str(garbage), "--out", str(tmp_path / "o")])
    assert "is not a forum store" in err


def test_serve_sample_fetch_and_dataset_the_demo_way(tmp_path):
    """The lead's demo: serve the bundled forum, crawl it with --delay 0, build the dataset."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "crawl", "serve-sample", "--port", "0"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("serving sample forum at http://127.0.0.1:"), line
        forum_url = line.split(" at ", 1)[1].strip()
        assert forum_url.endswith("/forum/1/Ski-Gabber")
        db, out = tmp_path / "forum.sqlite", tmp_path / "dataset"
        assert main(["fetch", "--forum-url", forum_url, "--db", str(db), "--delay", "0"]) == 0
        assert main(["dataset", "--db", str(db), "--out", str(out)]) == 0
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
    stats = json.loads((out / "stats.json").read_text())
    threads = yaml.safe_load(SAMPLE_FORUM.read_text(encoding="utf-8"))["threads"]
    assert 2 * len(threads) <= stats["rows"] <= 5 * len(threads)
    assert stats["threads"] == len(threads) and stats["splits"]["test"]["rows"] > 0
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    for row in rows:
        assert set(row) == {"prompt", "completion", "thread_id", "post_id", "source_url"}
        assert row["prompt"][0]["role"] == "user" and row["completion"][0]["role"] == "assistant"
        answer = row["completion"][0]["content"]
        for leak in ("This post was edited", "[URL]", "[img]", "[INST]", "<s>", "&#039;", "wrote:"):
            assert leak not in answer, (leak, answer)
    assert all(
        n > 0 for rule, n in stats["dropped"].items() if rule not in ("too_long", "prompt_too_long")
    )


def test_check_a_saved_thread_page_shows_what_the_parser_found(capsys):
    page = FIXTURES / "forum/site" / THREAD_700003 / "page-1.html"
    assert main(["check", str(page)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"thread page {page.resolve().as_uri()}\n")
    assert "  title: Park skis in powder - too soft?  (thread 700003)\n" in out
    assert (
        "  posts: 3  authors: 3/3  dates: 3/3  quotes: 1  edited: 2  deleted: 0  signatures: 1\n"
        in out
    )
    assert "  next page: yes  page count: 3\n" in out
    assert "#2 4800011 pnw_pillows 2023-01-11T08:36:41: A soft 98 is fine in powder." in out
    assert "  verified  div.post-body " in out
    assert "  assumed   div.post-header a.username " in out
    assert out.rstrip().endswith("fallbacks used: none")


def test_check_a_page_with_only_the_verified_markup_says_what_fell_back(capsys, tmp_path):
    from crawl.sample_render import render

    render(FIXTURES / "forum-markup/threads.yaml", tmp_path / "site", "verified")
    thread = "forum/thread/710002/Tuning---base-bevel-0-5-or-1-degree-"
    url = f"https://www.newschoolers.com/{thread}"
    assert main(["check", str(tmp_path / "site" / thread / "page-1.html"), "--url", url]) == 0
    out = capsys.readouterr().out
    assert "  title: Tuning - base bevel 0.5 or 1 degree?  (thread 710002)\n" in out
    assert "  posts: 5  authors: 0/5  dates: 0/5" in out
    assert "  recovered: 3 posts read out of posts that swallowed them\n" in out
    assert "  next page: yes" in out
    assert "div.posts div.post" in out and "matched nothing" in out
    assert (
        "fallbacks used: thread-id:url, title:<title>, next:page-link, posts:div.post-body" in out
    )
    listing = tmp_path / "site/forum/1/Ski-Gabber/page-1.html"
    assert main(["check", str(listing)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("listing page ") and "  threads: 4  sticky: 0  next page: yes" in out


def test_check_a_live_page_obeys_robots_txt(capsys):
    with serve_sample(FIXTURES / "forum/site") as forum_url:
        origin = forum_url.removesuffix("/forum/1/Ski-Gabber")
        assert main(["check", forum_url]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"listing page {forum_url}\n") and "  threads: 4  sticky: 1" in out
        assert main(["check", f"{origin}/{THREAD_700003}?page=2"]) == 0
        assert "  posts: 3  authors: 3/3" in capsys.readouterr().out
        err = one_line_error(capsys, ["check", f"{origin}/forum/thread/700004/Disallowed-thread"])
        assert "robots.txt of http://127.0.0.1:" in err and "disallows" in err


def test_check_failures_are_one_line(capsys, tmp_path):
    err = one_line_error(capsys, ["check", str(tmp_path / "missing.html")])
    assert "is neither a file nor an http(s) URL" in err
    err = one_line_error(capsys, ["check", str(FIXTURES / "forum/pages/challenge.html")])
    assert "neither a listing nor a thread page" in err
    url = "https://www.newschoolers.com/forum/thread/1/x"
    challenge = str(FIXTURES / "forum/pages/challenge.html")
    err = one_line_error(capsys, ["check", challenge, "--url", url])
    assert "nothing could be read as a thread page: no main#thread and no div.post-body" in err


def test_fetch_ends_with_an_error_when_the_listing_stops_before_its_end(capsys, tmp_path):
    """A listing page whose rows vanished is not the end of the forum: exit 2, and say where."""
    site_dir = tmp_path / "site"
    shutil.copytree(FIXTURES / "forum/site", site_dir)
    listing_page_2 = site_dir / "forum/1/Ski-Gabber/page-2.html"
    shutil.copy(FIXTURES / "forum/pages/listing-new-layout.html", listing_page_2)
    db = tmp_path / "f.sqlite"
    with serve_sample(site_dir) as forum_url:
        argv = ["fetch", "--forum-url", forum_url, "--db", str(db), "--delay", "0"]
        assert main(argv) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    *warnings, err = captured.err.splitlines()  # the crawl logged the page as it failed
    assert len(warnings) == 1 and warnings[0].endswith(
        f"parse_error: {forum_url}?page=2: no thread rows, although the previous listing page "
        "had rows and a next page: the listing layout changed? (run `python -m crawl check` "
        "on this URL)"
    )
    assert err.startswith(
        f"error: the listing stopped before the forum's end, at {forum_url}?page=2: no thread rows"
    )
    assert err.endswith("fix the cause and run the same command to go on")
    assert "Traceback" not in captured.err
    assert f"the listing stopped early: {forum_url}?page=2: no thread rows" in captured.out
    assert "crawled 4 threads" in captured.out  # page 1's threads are all in the store
