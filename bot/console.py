"""``python -m bot --console``: chat with the model in a terminal, through the same engine.

For operators trying a model before wiring Discord, and for the offline demo.
Each line is a question to the finetuned model (the base model when no
adapter is loaded); ``/compare QUESTION`` asks both, ``/base QUESTION`` the
base only, ``/models`` lists the served models and ``/model NAME`` sends the
next lines to another one (an adapter by its name), ``/status`` says whether
answers are grounded on the forum (``FORUM_DB``), ``/reset`` forgets the
conversation, ``/quit`` (or Ctrl-D) leaves.
A grounded answer is followed by its sources: thread title, link and excerpt.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

from bot.serving.adapters import BASE, FINETUNED
from bot.serving.engine import Engine, EngineError, Message, Variant
from bot.serving.settings import EngineSettings

if TYPE_CHECKING:
    from crawl.search import Passage

HELP = (
    "Ask a question, or: /compare QUESTION, /base QUESTION, /models, /model NAME, "
    "/status, /reset, /quit"
)


class ConsoleChat:
    """A conversation held in memory, answered by ``engine``; output goes to ``out``."""

    def __init__(self, engine: Engine, *, out: TextIO = sys.stdout):
        self.engine = engine
        self.out = out
        self.history: list[Message] = []
        self.model: Variant | None = None  # what plain lines ask; None: the default

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _messages(self, question: str) -> list[Message]:
        return [*self.history, {"role": "user", "content": question}]

    async def handle(self, line: str) -> bool:
        """Answer one input line; False when the user asked to leave."""
        command, _, rest = line.strip().partition(" ")
        if not line.strip():
            return True
        if command in {"/quit", "/exit"}:
            return False
        if command == "/help":
            self._write(HELP + "\n")
        elif command == "/status":
            self._write(f"grounding {self.engine.status().grounding}\n")
        elif command == "/reset":
            self.history.clear()
            self._write("(conversation forgotten)\n")
        elif command == "/compare":
            await self._compare(rest.strip())
        elif command == "/base":
            await self._ask(rest.strip(), BASE)
        elif command == "/models":
            self._write(self._models_text())
        elif command == "/model":
            self._choose(rest.strip())
        else:
            await self._ask(line.strip(), self.model or self._default())
        return True

    def _default(self) -> Variant:
        return FINETUNED if self.engine.models().default is not None else BASE

    def _models_text(self) -> str:
        served = self.engine.models()
        marks = {FINETUNED: f" (= {served.default})", served.default: " (default)"}
        return "".join(f"  {name}{marks.get(name, '')}\n" for name in served.names)

    def _choose(self, name: str) -> None:
        served = self.engine.models()
        if name not in served.names:
            self._write(f"no model called {name!r}: pick one of {', '.join(served.names)}\n")
            return
        self.model = name
        self._write(f"(asking {name} from now on)\n")

    async def _ask(self, question: str, variant: Variant) -> None:
        if not question:
            self._write(HELP + "\n")
            return
        self._write(f"[{variant}] ")
        try:
            answer = await self.engine.generate(
                self._messages(question), variant=variant, on_text=self._write
            )
        except EngineError as exc:
            self._write(f"\nerror: {exc}\n")
            return
        self._write("\n" + sources_text(answer.sources))
        self.history += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer.text},
        ]

    async def _compare(self, question: str) -> None:
        if not question:
            self._write(HELP + "\n")
            return
        try:
            base, finetuned = await self.engine.compare(self._messages(question))
        except EngineError as exc:
            self._write(f"error: {exc}\n")
            return
        for answer in (base, finetuned):
            self._write(f"--- {answer.variant} ---\n{answer.text}\n")
        self._write(sources_text(finetuned.sources))


def sources_text(passages: Sequence[Passage]) -> str:
    """The sources under a grounded answer, one per line with its excerpt; "" for none."""
    lines = [
        f'  [{number}] {p.title} <{p.url}>\n      "{p.excerpt}"'
        for number, p in enumerate(passages, 1)
    ]
    return "sources:\n" + "\n".join(lines) + "\n" if lines else ""


async def run_console(
    settings: EngineSettings,
    *,
    engine: Engine | None = None,
    read_line: Callable[[], str] = input,
    out: TextIO = sys.stdout,
) -> int:
    """Load the engine and chat until ``/quit`` or end of input."""
    if engine is None:
        from bot.serving.factory import build_engine

        engine = build_engine(settings)
    out.write("loading the model…\n")
    await engine.start()
    out.write(f"grounding {engine.status().grounding}\n")
    chat = ConsoleChat(engine, out=out)
    out.write(HELP + "\n")
    try:
        while True:
            try:
                line = await asyncio.to_thread(read_line)
            except EOFError:
                break
            if not await chat.handle(line):
                break
    finally:
        await engine.close()
    return 0
