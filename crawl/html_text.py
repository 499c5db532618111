"""HTML fragment → the text a reader sees, with line breaks where the page has them.

``get_text()`` would glue words across ``<br>`` and block boundaries and drop
link targets; forum posts need both: hard line breaks are kept (the cleaner
decides later which are paragraph ends), a link keeps its label, or its URL
when the label is only a URL, and an image becomes an ``[img]`` marker so an
image-only reply is recognisable downstream.
"""

from __future__ import annotations

import re

from bs4.element import Comment, NavigableString, Tag

BLOCK_TAGS = frozenset(
    {
        "p",
        "div",
        "blockquote",
        "ul",
        "ol",
        "li",
        "pre",
        "table",
        "tr",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
    }
)
SKIP_TAGS = frozenset({"script", "style", "noscript", "template", "iframe"})

_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_URLISH = re.compile(r"^(?:https?://|www\.)\S*$|^\S+\.(?:com|org|net|be|ly|io)/\S*$", re.I)


def element_text(element: Tag) -> str:
    """The readable text of ``element``: lines trimmed, at most one blank line in a row."""
    parts: list[str] = []
    _walk(element, parts)
    lines = (_SPACES.sub(" ", line).strip() for line in "".join(parts).split("\n"))
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _walk(node: Tag, out: list[str]) -> None:
    for child in node.children:
        if isinstance(child, Comment):
            continue
        if isinstance(child, NavigableString):
            # Source newlines inside HTML are not line breaks: only <br> and blocks are.
            out.append(re.sub(r"\s+", " ", str(child)))
            continue
        if not isinstance(child, Tag) or child.name in SKIP_TAGS:
            continue
        if child.name == "br":
            out.append("\n")
        elif child.name == "img":
            src = child.get("src") or ""
            out.append(f"[img]{src}[/img]" if src else "")
        elif child.name == "a":
            out.append(_link_text(child))
        elif child.name in BLOCK_TAGS:
            out.append("\n\n" if child.name != "li" else "\n- ")
            _walk(child, out)
            out.append("\n\n" if child.name != "li" else "\n")
        else:
            _walk(child, out)


def _link_text(link: Tag) -> str:
    label_parts: list[str] = []
    _walk(link, label_parts)
    label = re.sub(r"\s+", " ", "".join(label_parts)).strip()
    href = str(link.get("href") or "").strip()
    if not label or (_URLISH.match(label) and href.startswith(("http://", "https://"))):
        return href or label
    return label
