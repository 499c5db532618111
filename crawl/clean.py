"""The cleaning rules that turn forum posts into training text, each one named and counted.

The reference run trained on raw post text and learned to answer with "This
post was edited on …", bbcode, bare links and ``[INST]``. Every rule here
exists because of something like that, and every rule reports whether it
fired, so ``stats.json`` can say what the cleaning did to the data.

Two kinds of rule: *edits* rewrite a text (and count posts changed), *drops*
reject a reply as an answer (and count rows dropped). Both work on the text
the store holds, which the site parser has already separated from the post's
quotes and signature.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from difflib import SequenceMatcher

# --- edits, applied in this order ------------------------------------------------------
EDITED_LINE = re.compile(
    r"^[ \t]*\**[ \t]*This (?:post|thread|reply) was (?:last )?edited (?:on|by) .*$\n?",
    re.I | re.M,
)
BBCODE_QUOTE = re.compile(r"\[quote(?:=[^\]]*)?\](?:(?!\[quote).)*?\[/quote\]", re.I | re.S)
EMAIL_QUOTE = re.compile(r"^[ \t]*>.*$\n?", re.M)
TEXT_SIGNATURE = re.compile(r"\n[ \t]*--[ \t]*\n(?:.*\n?){1,4}\Z")
# The turn markers of every common chat template: a post that contains one would teach
# the model to write it (or to end its turn in the middle of an answer).
CONTROL_STRING = re.compile(
    r"\[/?INST\]|<</?SYS>>"  # Mistral, Llama 2
    r"|\[/?(?:SYS|SYSTEM_PROMPT|AVAILABLE_TOOLS|TOOL_CALLS|TOOL_RESULTS|Question|Answer)\]"
    r"|</?s>|<(?:bos|eos|pad|unk|start_of_turn|end_of_turn)>"  # Gemma and bare tokens
    r"|<\|[a-z0-9_]+\|>"  # ChatML <|im_start|>, Llama 3 <|eot_id|>, Phi <|user|>
    r"|<｜[^｜<>\n]{1,40}｜>",  # DeepSeek's full-width bars
    re.I,
)
BBCODE_IMG = re.compile(r"\[img(?:=[^\]]*)?\].*?\[/img\]", re.I | re.S)
BBCODE_LINK = re.compile(r"\[(url|link|email)=([^\]]+)\](.*?)\[/\1\]", re.I | re.S)
BBCODE_BARE_LINK = re.compile(r"\[(url|link|email|youtube|video|vimeo)\](.*?)\[/\1\]", re.I | re.S)
BBCODE_LIST_ITEM = re.compile(r"\[\*\]\s*")
BBCODE_TAG = re.compile(
    r"\[/?(?:b|i|u|s|strike|sup|sub|color|colour|size|font|center|left|right|justify|"
    r"spoiler|list|code|quote|url|img|youtube|video|vimeo|email|link|indent|hr|table|tr|td)"
    r"(?:=[^\]]*)?\]",
    re.I,
)
HTML_BREAK = re.compile(r"<br\s*/?>", re.I)
HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?>")
ZERO_WIDTH = re.compile(r"[\u200b-\u200d\u2060\ufeff]")

# --- drops -----------------------------------------------------------------------------
URL = re.compile(r"(?:https?://|www\.)\S+", re.I)
IMAGE_URL = re.compile(r"\.(?:jpe?g|png|gif|webp)(?:\?\S*)?$|//images\.", re.I)


@dataclass
class Cleaned:
    """A text after the edits, with the edits that changed it."""

    text: str
    edits: list[str] = field(default_factory=list)
    had_image: bool = False


def _edit_entities(text: str) -> str:
    # Twice: double-encoded text (&amp;#039;) is common in old posts.
    return html.unescape(html.unescape(text))


def _edit_edited_lines(text: str) -> str:
    return EDITED_LINE.sub("", text)


def _edit_quotes(text: str) -> str:
    previous = None
    while previous != text:  # innermost first, so nested quotes go with their parents
        previous, text = text, BBCODE_QUOTE.sub("", text)
    return EMAIL_QUOTE.sub("", text)


def _edit_signature(text: str) -> str:
    return TEXT_SIGNATURE.sub("\n", text)


def _edit_control_strings(text: str) -> str:
    return CONTROL_STRING.sub("", text)


def _edit_bbcode(text: str) -> str:
    text = BBCODE_IMG.sub("", text)

    def link(match: re.Match[str]) -> str:
        target, label = match.group(2).strip(), match.group(3).strip()
        return label if label and not BBCODE_IMG.search(label) else target

    text = BBCODE_LINK.sub(link, text)
    text = BBCODE_BARE_LINK.sub(lambda m: m.group(2).strip(), text)
    text = BBCODE_LIST_ITEM.sub("- ", text)
    return BBCODE_TAG.sub("", text)


def _edit_html(text: str) -> str:
    return HTML_TAG.sub("", HTML_BREAK.sub("\n", text))


def _edit_whitespace(text: str) -> str:
    text = ZERO_WIDTH.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = unicodedata.normalize("NFC", text).replace("\u00a0", " ")
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [re.sub(r"[ \t]+", " ", line).strip() for line in block.split("\n")]
        lines = [line for line in lines if line]
        if lines:
            paragraphs.append(_join_hard_wraps(lines))
    return "\n\n".join(paragraphs)


def _join_hard_wraps(lines: list[str]) -> str:
    """Join lines broken mid-sentence (old posts have ``<br />`` inside sentences)."""
    out = [lines[0]]
    for line in lines[1:]:
        previous = out[-1]
        mid_sentence = previous[-1] not in ".!?:;)\"'" and (line[0].islower() or line[0] == ",")
        if mid_sentence and not line.startswith("- "):
            out[-1] = f"{previous} {line}"
        else:
            out.append(line)
    return "\n".join(out)


# Each edit with the name it is counted under in stats.json, in the order applied.
EDITS: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("entities", _edit_entities),
    ("edited_line", _edit_edited_lines),
    ("quoted_block", _edit_quotes),
    ("signature", _edit_signature),
    ("control_strings", _edit_control_strings),
    ("bbcode", _edit_bbcode),
    ("html", _edit_html),
    ("whitespace", _edit_whitespace),
)


def clean_text(text: str, *, quotes: int = 0, signature: str = "") -> Cleaned:
    """Apply every edit. ``quotes``/``signature`` are what the parser already took out of the
    post: they count under the same rules, since the answer is cleaned of them all the same."""
    result = Cleaned(text, had_image=bool(BBCODE_IMG.search(text)))
    for name, edit in EDITS:
        edited = edit(result.text)
        if edited != result.text:
            result.edits.append(name)
            result.text = edited
    if quotes and "quoted_block" not in result.edits:
        result.edits.append("quoted_block")
    if signature and "signature" not in result.edits:
        result.edits.append("signature")
    return result


def normalise(text: str) -> str:
    """The near-duplicate key: case, punctuation, emoji and spacing do not make a new answer."""
    words = re.findall(r"[^\W_]+", text.casefold())
    return " ".join(words)


def content_drop(cleaned: Cleaned) -> str | None:
    """Why a cleaned reply carries no answer (the rule's name), or None if it may."""
    text = cleaned.text
    without_urls = URL.sub("", text).strip()
    urls = URL.findall(text)
    if not text:
        return "image_only" if cleaned.had_image else "empty"
    if urls and not re.search(r"[^\W_]", without_urls):
        if cleaned.had_image or all(IMAGE_URL.search(u) for u in urls):
            return "image_only"
        return "url_only"
    if not any(ch.isalnum() for ch in text):
        return "emoji_only"
    return None


def repeats(answer: str, question: str, *, threshold: float = 0.9) -> bool:
    """Whether ``answer`` only says the question again (reposted, or quoted without a reply)."""
    a, q = normalise(answer), normalise(question)
    if not a or not q:
        return False
    if f" {a} " in f" {q} " and len(a) >= len(q) / 2:  # a short answer may well reuse its words
        return True
    return SequenceMatcher(None, a, q, autojunk=False).ratio() >= threshold
