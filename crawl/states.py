"""The states a crawled page and a crawled thread can be in, as types a checker can hold.

The fetcher says how asking for a URL ended, the store keeps it per page
(plus whether the page parsed), the crawler derives each thread's state from
its pages, and the summary and ``stats.json`` count them. They live here, in
a module that imports nothing, so the store and the search index (which the
bot imports) need not load the fetcher's HTTP stack to name a state.
"""

from __future__ import annotations

from typing import Literal

# How asking for one URL ended: fetch_error is retries exhausted, disallowed is robots.txt.
FetchState = Literal["ok", "not_modified", "not_found", "http_error", "fetch_error", "disallowed"]
# What the store knows of a page: how fetching it ended, or that it came but did not parse.
PageState = Literal[FetchState, "parse_error"]
# Where the crawl of a thread stands: partial means more pages than --pages-per-thread, or
# pages after the first that robots.txt disallows; error, a page that could not be read.
ThreadState = Literal["pending", "partial", "done", "not_found", "disallowed", "error"]
