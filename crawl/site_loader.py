"""Which forum sites the crawler knows, by name: the one module that imports them all.

Like Scrapy's spider loader, the registry sits above the site modules rather
than beside their interface: :mod:`crawl.site` defines what a site is, each
site module implements it, and only this module knows every site. A site
module never imports the registry back, so adding a forum adds no cycle.
"""

from __future__ import annotations

from collections.abc import Callable

from crawl.newschoolers import NewschoolersSite
from crawl.site import ForumSite

SITES: dict[str, Callable[[], ForumSite]] = {"newschoolers": NewschoolersSite}


def get_site(name: str) -> ForumSite:
    """A fresh site object for the site registered as ``name``; KeyError if none is."""
    return SITES[name]()
