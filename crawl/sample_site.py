"""Serve a directory of saved forum pages the way the site would, on a loopback port.

The offline demo and the crawler tests point the real crawler at this server.
URLs map onto the layout :mod:`crawl.sample_render` writes: a path is a
directory, ``?page=N`` picks ``page-N.html`` in it. Past the last page a
listing answers with its empty page (``past-end.html``, 200) and a thread with
404, and a directory holding only one subdirectory (``/forum/thread/<id>``,
no slug) answers 301 to it: the site's behaviours as docs/crawl.md ("What is known of
newschoolers.com") lists them, assumed ones included.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware

SAMPLE_FORUM_DIR = Path(__file__).parent / "sample_forum" / "site"

NOT_FOUND_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>Page not found - Newschoolers.com</title></head>"
    "<body><h1>404</h1><p>That page does not exist.</p></body></html>\n"
)


def first_listing_path(root: Path) -> str:
    """The path of the first forum listing under ``root`` (``/forum/<id>/<Slug>``)."""
    candidates = sorted(
        listing
        for listing in root.glob("forum/*/*")
        if listing.parent.name.isdigit() and (listing / "page-1.html").is_file()
    )
    if not candidates:
        raise FileNotFoundError(f"no forum listing (forum/<id>/<Slug>/page-1.html) under {root}")
    return "/" + candidates[0].relative_to(root).as_posix()


def make_app(
    root: Path = SAMPLE_FORUM_DIR, middlewares: Iterable[Middleware] = ()
) -> web.Application:
    """The forum as an aiohttp app; ``middlewares`` let tests inject faults in front of it."""
    root = root.resolve()
    app = web.Application(middlewares=list(middlewares))

    async def serve(request: web.Request) -> web.StreamResponse:
        relative = request.path.strip("/")
        target = (root / relative).resolve()
        if not target.is_relative_to(root):
            return _not_found()
        if target.is_file() and target.name == "robots.txt":
            return web.FileResponse(target, headers={"Content-Type": "text/plain"})
        if not target.is_dir():
            return _not_found()
        page = request.query.get("page", "1")
        if not page.isdigit() or int(page) < 1:
            return _not_found()
        page_file = target / f"page-{int(page)}.html"
        if page_file.is_file():
            return web.FileResponse(page_file)
        if (target / "past-end.html").is_file() and int(page) > 1:
            return web.FileResponse(target / "past-end.html")
        children = [c for c in target.iterdir() if c.is_dir()]
        if len(children) == 1 and not any(target.glob("*.html")):
            location = f"/{relative}/{children[0].name}"
            if request.query_string:
                location += f"?{request.query_string}"
            raise web.HTTPMovedPermanently(location=location)
        return _not_found()

    app.router.add_get("/{tail:.*}", serve)
    return app


def _not_found() -> web.Response:
    return web.Response(status=404, text=NOT_FOUND_PAGE, content_type="text/html")


@asynccontextmanager
async def serve_forum(
    root: Path = SAMPLE_FORUM_DIR,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    middlewares: Iterable[Middleware] = (),
) -> AsyncIterator[str]:
    """Run the forum in this event loop; yields its base URL (``http://host:port``)."""
    runner = web.AppRunner(make_app(root, middlewares), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        yield f"http://{bound_host}:{bound_port}"
    finally:
        await runner.cleanup()
