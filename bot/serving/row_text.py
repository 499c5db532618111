"""One answer's text as its tokens arrive: decoded incrementally, cut at stop strings, streamed safely.

A row's text is re-decoded from a short window of recent tokens, not from
its first token, so a step costs the same at token 1,000 as at token 1. The
window starts a few tokens back (at the previous clean point), so decoders
that change a token's text by what precedes it (SentencePiece's leading
space) give the same text as decoding everything at once.

What is streamed never splits a UTF-8 character (nor shows the replacement
character a decoder writes for bytes that make no character), never shows the start of a
stop string that may still complete, and adds up exactly to the final
answer (which is stripped, so edge whitespace waits until text follows it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from finetune.generation import strip_stop_strings

REPLACEMENT = "\ufffd"  # what a decoder shows for half a UTF-8 character


class RowText:
    """The decoded text of one row, and how much of it the caller has been shown."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.tokens: list[int] = []
        self.text = ""
        self.stopped = False  # a stop string appeared; ``text`` ends before it
        self.shown = 0  # characters of ``text`` handed to the caller
        self._prefix = 0  # decoding window: tokens[_prefix:_read] are already in ``text``
        self._read = 0
        self._prefix_text = ""

    def add(self, token: int) -> bool:
        """Take the row's next token; True once a stop string appeared (the row is done)."""
        self.tokens.append(token)
        checked = len(self.text)
        self._decode(final=False)
        for stop in self.stop_strings:
            index = self.text.find(stop, max(0, checked - len(stop) + 1))
            if index != -1:
                self.text, self.stopped = self.text[:index], True
        return self.stopped

    def finish(self) -> None:
        """The row ended: whatever is still undecoded is text now (half a character is dropped)."""
        if not self.stopped:
            self._decode(final=True)

    def answer(self) -> str:
        return strip_stop_strings(self.text, self.stop_strings)

    def take_new(self, *, final: bool) -> str:
        """The text to stream now beyond what was shown: only what can no longer change,
        unless ``final``. The answer starts at its first visible character."""
        end = len(self.text) if final or self.stopped else self._settled_end()
        end = len(self.text[:end].rstrip())
        start = self.shown or end - len(self.text[:end].lstrip())
        if start >= end:
            return ""
        self.shown = end
        return self.text[start:end]

    def _decode(self, *, final: bool) -> None:
        window = self.tokenizer.decode(self.tokens[self._prefix :], skip_special_tokens=True)
        if len(window) <= len(self._prefix_text):
            return
        if window.endswith(REPLACEMENT) and not final:
            return  # half a character: wait for the token that completes it
        new = window[len(self._prefix_text) :]
        # A replacement character that stays is bytes no character can be made of (or half a
        # character at the very end): noise the reader should never see, streamed or final.
        self.text += new.replace(REPLACEMENT, "")
        self._prefix, self._read = self._read, len(self.tokens)
        self._prefix_text = self.tokenizer.decode(
            self.tokens[self._prefix : self._read], skip_special_tokens=True
        )

    def _settled_end(self) -> int:
        """Where the text that cannot change ends: before a trailing start of a stop string."""
        end = len(self.text)
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, end), 0, -1):
                if self.text[end - size : end] == stop[:size]:
                    end -= size
                    break
        return end
