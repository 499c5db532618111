"""The web chat: ``GET /`` serves a chat page that talks to this API from the browser.

The page is a few small static files in ``bot/api/static/`` (no build step, no
CDN, nothing fetched from elsewhere). It needs no token to load: it holds no
secret and asks for ``API_TOKEN`` itself when ``/v1/`` wants one, sending it as
a bearer header like any other client.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).with_name("static")

# Model output is rendered by the page's own DOM builder (static/markdown.js),
# never as HTML; this policy is a second wall behind it: no inline script, no
# script, style, image or connection to any other origin.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def add_webchat_routes(app: web.Application, *, feedback: bool = False) -> None:
    """Serve the page on ``/`` and its files under ``/static/``.

    ``feedback`` shows the vote buttons; without a feedback store they would
    only fail.
    """
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    if feedback:
        page = page.replace('data-feedback="off"', 'data-feedback="on"', 1)

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html", headers=_PAGE_HEADERS)

    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC_DIR)
    app.on_response_prepare.append(_revalidate_static)


async def _revalidate_static(request: web.Request, response: web.StreamResponse) -> None:
    """Browsers revalidate the scripts on each load, so an upgrade never mixes old and new."""
    if request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-cache")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
