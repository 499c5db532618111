"""``python -m crawl``: crawl a forum into a store, build the Q/A dataset, serve the sample forum.

python -m crawl check URL_OR_FILE [--url URL] [--user-agent TEXT] [--timeout SECONDS]
python -m crawl fetch [--forum-url URL] --db FILE [--max-threads N] [--pages-per-thread 10]
                      [--concurrency 4] [--delay SECONDS] [--refresh]
python -m crawl dataset --db FILE --out DIR [--test-fraction 0.1] [--seed 0]
                        [--min-answer-chars N] [--max-chars N] [--tokenizer NAME_OR_DIR]
                        [--copypasta-threads 3] [--context K] [--distractors 0.2]
python -m crawl index --db FILE [--rebuild]
python -m crawl serve-sample [--host 127.0.0.1] [--port 0] [--dir DIR]

The option names are a stable interface: operators' scripts depend on them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from crawl.errors import CrawlError, cli_entry
from crawl.fetcher import DEFAULT_USER_AGENT, FetchOptions
from freeski_common.cli import ArgumentParser
from freeski_common.shutdown import stop_requested


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _positive_int(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _at_least_two(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("1 would make every text copypasta: give 2 or more")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("0 would mean no time at all")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


def default_user_agent() -> str:
    """``CRAWL_USER_AGENT`` from the environment or ``.env`` (see .env.example), else ours.

    The site's operators should be able to tell who is crawling and how to reach
    them; an environment variable lets a deployment say so once for every run.
    """
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True), override=False)
    return os.environ.get("CRAWL_USER_AGENT", "").strip() or DEFAULT_USER_AGENT


def build_parser() -> argparse.ArgumentParser:
    from crawl.site_loader import SITES, get_site

    parser = ArgumentParser(
        prog="python -m crawl",
        description="Crawl a forum into a store, build the Q/A dataset, serve the sample forum.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fetch = commands.add_parser("fetch", help="crawl a forum into a SQLite store (resumable)")
    fetch.add_argument(
        "--forum-url",
        metavar="URL",
        help="the forum's first listing page (default: the --site's own, "
        + ", ".join(f"{name}: {get_site(name).default_forum_url}" for name in sorted(SITES))
        + ")",
    )
    fetch.add_argument(
        "--db",
        metavar="FILE",
        required=True,
        type=Path,
        help="the SQLite store to write (created if missing)",
    )
    fetch.add_argument(
        "--max-threads",
        metavar="N",
        type=_positive_int,
        help="stop after this many threads (default: all)",
    )
    fetch.add_argument(
        "--pages-per-thread",
        metavar="N",
        type=_positive_int,
        default=10,
        help="pages to fetch per thread (default: %(default)s)",
    )
    fetch.add_argument(
        "--concurrency",
        metavar="N",
        type=_positive_int,
        default=4,
        help="requests in flight at most (default: %(default)s)",
    )
    fetch.add_argument(
        "--delay",
        metavar="SECONDS",
        type=_seconds,
        default=1.0,
        help="seconds between requests to the host; robots.txt Crawl-delay wins when longer (default: %(default)s)",
    )
    fetch.add_argument(
        "--refresh",
        action="store_true",
        help="fetch pages again even if the store has them (conditional requests)",
    )
    fetch.add_argument(
        "--user-agent",
        metavar="TEXT",
        default=default_user_agent(),
        help="User-Agent header, also matched against robots.txt (default: $CRAWL_USER_AGENT, "
        "else the crawler's own)",
    )
    fetch.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_seconds,
        default=30.0,
        help="seconds per request (default: %(default)s)",
    )
    fetch.add_argument(
        "--max-tries",
        metavar="N",
        type=_positive_int,
        default=5,
        help="tries per page before it is recorded as failed (default: %(default)s)",
    )
    fetch.add_argument(
        "--max-page-bytes",
        metavar="N",
        type=_positive_int,
        default=FetchOptions.max_page_bytes,
        help="a page whose body (decompressed) is larger is recorded as failed "
        "(default: %(default)s, 5 MiB)",
    )
    fetch.add_argument(
        "--site",
        choices=sorted(SITES),
        default="newschoolers",
        help="the site module that parses the pages (default: %(default)s)",
    )

    dataset = commands.add_parser(
        "dataset", help="build train.jsonl / test.jsonl / stats.json from a store"
    )
    dataset.add_argument(
        "--db", metavar="FILE", required=True, type=Path, help="the store `fetch` wrote"
    )
    dataset.add_argument(
        "--out",
        metavar="DIR",
        required=True,
        type=Path,
        help="directory for train.jsonl, test.jsonl, stats.json",
    )
    dataset.add_argument(
        "--test-fraction",
        metavar="FRACTION",
        type=_fraction,
        default=0.1,
        help="share of threads in test.jsonl (default: %(default)s)",
    )
    dataset.add_argument(
        "--seed", metavar="N", type=int, default=0, help="split seed (default: %(default)s)"
    )
    dataset.add_argument(
        "--min-answer-chars",
        metavar="N",
        type=_positive_int,
        default=20,
        help="drop shorter answers (default: %(default)s)",
    )
    dataset.add_argument(
        "--max-chars",
        metavar="N",
        type=_positive_int,
        default=4000,
        help="drop longer answers and prompts (default: %(default)s)",
    )
    dataset.add_argument(
        "--tokenizer",
        metavar="NAME_OR_DIR",
        help="tokenizer name or directory for token-length stats (optional)",
    )
    dataset.add_argument(
        "--copypasta-threads",
        metavar="N",
        type=_at_least_two,
        default=3,
        help="drop every copy of a text posted in this many different threads or more "
        "(spam, signatures, copypasta) (default: %(default)s)",
    )

    dataset.add_argument(
        "--context",
        metavar="K",
        type=_non_negative_int,
        default=0,
        help="put K passages found by the search index in each prompt (the grounded layout "
        "the bot answers with); 0 for questions alone (default: %(default)s)",
    )
    dataset.add_argument(
        "--distractors",
        metavar="FRACTION",
        type=_fraction,
        default=0.2,
        help="with --context: the share of rows whose passages all come from other threads, "
        "so the model learns to ignore context that does not answer (default: %(default)s)",
    )

    index = commands.add_parser(
        "index", help="build or bring up to date a store's search index (resumable)"
    )
    index.add_argument(
        "--db", metavar="FILE", required=True, type=Path, help="the SQLite store to index"
    )
    index.add_argument(
        "--rebuild",
        action="store_true",
        help="index every thread again, not only those changed since the last indexing",
    )

    check = commands.add_parser(
        "check",
        help="show what the parser finds on one page (run it on the live site before a crawl)",
    )
    check.add_argument(
        "target",
        metavar="URL_OR_FILE",
        help="a listing or thread page: an http(s) URL (robots.txt obeyed) or a saved HTML file",
    )
    check.add_argument(
        "--url",
        metavar="URL",
        help="for a saved file: the URL it was saved from (thread id, page number)",
    )
    check.add_argument(
        "--user-agent",
        metavar="TEXT",
        default=default_user_agent(),
        help="User-Agent header, also matched against robots.txt (default: as for fetch)",
    )
    check.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_seconds,
        default=30.0,
        help="seconds for the request (default: %(default)s)",
    )
    check.add_argument(
        "--site",
        choices=sorted(SITES),
        default="newschoolers",
        help="the site module that parses the page (default: %(default)s)",
    )

    serve = commands.add_parser(
        "serve-sample", help="serve the bundled sample forum on a local port"
    )
    serve.add_argument(
        "--host",
        metavar="HOST",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s)",
    )
    serve.add_argument(
        "--port",
        metavar="PORT",
        type=int,
        default=0,
        help="port, 0 for any free one (default: %(default)s)",
    )
    serve.add_argument(
        "--dir",
        metavar="DIR",
        type=Path,
        help="a directory of pages in the sample layout (default: the bundled forum)",
    )
    return parser


def fetch_main(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from crawl.crawler import CrawlOptions, crawl
    from crawl.site_loader import get_site
    from crawl.store import Store

    fetch_options = FetchOptions(
        user_agent=args.user_agent,
        concurrency=args.concurrency,
        delay=args.delay,
        timeout=args.timeout,
        max_tries=args.max_tries,
        max_page_bytes=args.max_page_bytes,
    )
    site = get_site(args.site)
    options = CrawlOptions(
        forum_url=args.forum_url or site.default_forum_url,
        max_threads=args.max_threads,
        pages_per_thread=args.pages_per_thread,
        refresh=args.refresh,
    )
    with Store.open(args.db) as store, logging_redirect_tqdm():
        summary = asyncio.run(crawl(site, store, options, fetch_options))
        counts = store.counts()
    print(summary.describe())
    print(
        f"store {args.db}: {counts['threads']} threads, {counts['posts']} posts, {counts['pages']} pages"
    )
    if summary.listing_error:
        raise CrawlError(
            f"the listing stopped before the forum's end, at {summary.listing_error}; what was "
            "fetched is stored: fix the cause and run the same command to go on"
        )
    return 0


def dataset_main(args: argparse.Namespace) -> int:
    from crawl.dataset import DatasetOptions, build_dataset

    options = DatasetOptions(
        test_fraction=args.test_fraction,
        seed=args.seed,
        min_answer_chars=args.min_answer_chars,
        max_chars=args.max_chars,
        tokenizer=args.tokenizer,
        copypasta_threads=args.copypasta_threads,
        context=args.context,
        distractors=args.distractors,
    )
    stats = build_dataset(args.db, args.out, options)
    dropped = ", ".join(f"{rule} {n}" for rule, n in stats["dropped"].items() if n) or "none"
    print(
        f"wrote {stats['rows']} rows from {stats['threads']} threads to {args.out} "
        f"(train {stats['splits']['train']['rows']}, test {stats['splits']['test']['rows']}); "
        f"dropped: {dropped}"
    )
    return 0


def index_main(args: argparse.Namespace) -> int:
    from crawl.index import index_pending
    from crawl.store import Store

    with Store.open(args.db, create=False) as store:
        if args.rebuild:
            store.forget_index()
        summary = index_pending(store)
        total = store.index_counts()
    print(
        f"{summary.describe(args.db)}; the index holds {total['passages']} passages "
        f"from {total['threads']} threads"
    )
    return 0


def check_main(args: argparse.Namespace) -> int:
    from crawl.check import check_page, fetch_page, is_url, read_saved
    from crawl.site_loader import get_site

    if is_url(args.target):
        options = FetchOptions(
            user_agent=args.user_agent, concurrency=1, delay=0, timeout=args.timeout, max_tries=3
        )
        html, url = asyncio.run(fetch_page(args.target, options))
    else:
        html, url = read_saved(Path(args.target), args.url)
    print(check_page(get_site(args.site), html, url))
    return 0


def serve_sample_main(args: argparse.Namespace) -> int:
    from crawl.sample_site import SAMPLE_FORUM_DIR, first_listing_path, serve_forum

    root = args.dir or SAMPLE_FORUM_DIR
    try:
        listing = first_listing_path(root)
    except FileNotFoundError as exc:
        raise CrawlError(f"--dir: {exc}") from None

    async def serve() -> None:
        try:
            async with serve_forum(root, host=args.host, port=args.port) as base_url:
                print(f"serving sample forum at {base_url}{listing}", flush=True)
                with stop_requested() as stop:
                    await stop.wait()
        except OSError as exc:
            raise CrawlError(
                f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc})"
            ) from None

    asyncio.run(serve())
    return 0


COMMANDS = {
    "check": check_main,
    "fetch": fetch_main,
    "dataset": dataset_main,
    "index": index_main,
    "serve-sample": serve_sample_main,
}


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
