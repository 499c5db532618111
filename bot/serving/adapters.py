"""The served model names: the base, the ``finetuned`` alias and every named adapter.

One quantized base serves several LoRA adapters at once (vLLM's
``--lora-modules``): each has a name a request's ``model`` picks, and one of
them, the default, also answers to ``finetuned`` (Discord mentions, the
API's alias, ``/compare``'s default side). This module is the naming rules
and the snapshot every front end reads (:class:`ServedModels`); which
adapters are loaded is the engine's state, changed only through it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

BASE = "base"  # the base model, adapters off
FINETUNED = "finetuned"  # the alias of the default adapter; ADAPTER_PATH's adapter's own name
RESERVED_NAMES = frozenset({BASE, FINETUNED})
ADAPTER_NAME = re.compile(r"[a-z0-9._-]{1,32}")
NAME_RULE = "lowercase letters, digits, '.', '_' or '-', at most 32 characters"


def adapter_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an adapter an operator adds, or None if it can."""
    if not ADAPTER_NAME.fullmatch(name):
        return f"adapter name {name!r} is not valid: use {NAME_RULE}"
    if name in RESERVED_NAMES:
        return f"adapter name {name!r} is reserved: pick another than {BASE!r} or {FINETUNED!r}"
    return None


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter to serve: the name requests use and the directory it is read from."""

    name: str
    path: Path


def parse_adapters(raw: str) -> tuple[AdapterSpec, ...]:
    """``ADAPTERS``'s ``name=path,name=path`` list; ``ValueError`` says what is wrong with it."""
    specs: list[AdapterSpec] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, equals, path = (s.strip() for s in item.partition("="))
        if not equals or not name or not path:
            raise ValueError(f"{item!r} is not name=path")
        problem = adapter_name_problem(name)
        if problem:
            raise ValueError(problem)
        if any(spec.name == name for spec in specs):
            raise ValueError(f"two adapters are named {name!r}: give each its own name")
        specs.append(AdapterSpec(name, Path(path).expanduser()))
    if not specs:
        raise ValueError("it lists no adapter")
    return tuple(specs)


@dataclass(frozen=True)
class ServedAdapter:
    """A loaded adapter as front ends show it: its name, where it was read, its weights' hash."""

    name: str
    path: str
    weights_hash: str | None = None  # finetune.fingerprint.adapter_weights_hash


@dataclass(frozen=True)
class ServedModels:
    """What an engine answers to right now: ``base``, ``finetuned`` (with a default) and the adapters."""

    adapters: tuple[ServedAdapter, ...] = ()
    default: str | None = None  # the adapter behind FINETUNED; None without adapters

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a request may use, ``base`` and ``finetuned`` first (as ``/v1/models`` lists)."""
        aliases = (BASE, FINETUNED) if self.default is not None else (BASE,)
        return aliases + tuple(a.name for a in self.adapters if a.name not in aliases)

    def adapter(self, model: str) -> ServedAdapter | None:
        """The adapter that answers as ``model`` (the default for ``finetuned``), None for the base."""
        name = self.default if model == FINETUNED else model
        return next((a for a in self.adapters if a.name == name), None)
