"""The served model names as Discord shows them: autocomplete, checks, and ``/compare``'s sides.

The names come from the engine each time (:meth:`~bot.serving.engine.Engine.models`),
never from settings, since an admin can load, unload and promote adapters
while the bot runs. A name that is not served is refused before the
interaction is deferred, so the asker gets a private one-liner rather than
a public error.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from discord import app_commands

from bot.serving.adapters import FINETUNED, ServedModels

MAX_CHOICES = 25  # Discord shows at most this many autocomplete choices
SIDE_LETTERS = ("A", "B")


def name_choices(
    served: ServedModels, current: str, *, adapters_only: bool = False
) -> list[app_commands.Choice[str]]:
    """The served names containing ``current``; ``finetuned`` says which adapter it stands for."""
    names = [a.name for a in served.adapters] if adapters_only else list(served.names)
    typed = current.strip().lower()
    return [
        app_commands.Choice(name=describe(served, name), value=name)
        for name in names
        if typed in name.lower()
    ][:MAX_CHOICES]


def describe(served: ServedModels, name: str) -> str:
    """``finetuned (v2)`` for the alias, the name itself otherwise."""
    if name == FINETUNED and served.default not in (None, FINETUNED):
        return f"{FINETUNED} ({served.default})"
    return name


def unknown(served: ServedModels, name: str) -> str | None:
    """Why ``name`` cannot be asked (a polite sentence), or None when it is served."""
    if name in served.names:
        return None
    return f"There is no model called `{name}` here: pick one of {', '.join(served.names)}."


@dataclass(frozen=True)
class Sides:
    """The two models of a ``/compare`` in the order shown, and the labels they are shown under.

    Side A is always shown first. Blind, the two models are put in a random
    order and labelled only "A" and "B"; whoever votes is told which was which.
    """

    names: tuple[str, str]
    blind: bool

    @property
    def labels(self) -> tuple[str, str]:
        if self.blind:
            return SIDE_LETTERS
        return (f"A: {self.names[0]}", f"B: {self.names[1]}")


def comparison(
    served: ServedModels, a: str, b: str, *, blind: bool, rng: random.Random | None = None
) -> Sides | str:
    """The sides of comparing ``a`` with ``b``, or why they cannot be compared (a sentence)."""
    for name in (a, b):
        refusal = unknown(served, name)
        if refusal is not None:
            return refusal
    if a == b or (served.adapter(a) is not None and served.adapter(a) == served.adapter(b)):
        same = served.adapter(a)
        behind = f" (both are {same.name})" if same is not None and a != b else ""
        return f"Compare two different models{behind}: pick another for `a` or `b`."
    names = (a, b)
    if blind and (rng or random.SystemRandom()).random() < 0.5:
        names = (b, a)
    return Sides(names, blind)
