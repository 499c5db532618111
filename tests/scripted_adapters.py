"""A scripted engine serving named adapters, for the front ends' tests of several adapters.

Each adapter answers with the scripted words under its own name (so a test
sees which model wrote an answer), and its answers carry the adapter as a
local engine's do. Adapters can be loaded, unloaded and promoted, with the
refusals a real engine gives, without a model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any

from bot.serving.adapters import BASE, FINETUNED, ServedAdapter, ServedModels
from bot.serving.engine import AdapterRejected, Answer, Message, UnknownModel, Variant
from tests.scripted_engine import ScriptedEngine


def weights_of(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


class ScriptedAdapters(ScriptedEngine):
    """The scripted engine serving named adapters, loadable, unloadable and promotable.

    An adapter's answer is the scripted words under its own name (``finetuned``
    answers as the default adapter), and carries the adapter, as a local
    engine's answers do.
    """

    def __init__(self, names: Sequence[str], default: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.served = ServedModels(tuple(self._adapter(n, f"runs/{n}") for n in names), default)

    @staticmethod
    def _adapter(name: str, path: str) -> ServedAdapter:
        return ServedAdapter(name, path, weights_of(name))

    def models(self) -> ServedModels:
        return self.served

    async def generate(
        self, messages: Sequence[Message], *, variant: Variant = FINETUNED, **kwargs: Any
    ) -> Answer:
        if variant not in self.served.names:
            raise UnknownModel(f"no model is served as {variant!r}")
        adapter = self.served.adapter(variant)
        answer = await super().generate(
            messages, variant=adapter.name if adapter else BASE, **kwargs
        )
        return dataclasses.replace(answer, variant=variant, adapter=adapter)

    async def load_adapter(self, name: str, path: str | os.PathLike[str]) -> ServedAdapter:
        if name in self.served.names:
            raise AdapterRejected(f"an adapter named {name!r} is already served")
        adapter = self._adapter(name, str(path))
        self.served = dataclasses.replace(self.served, adapters=(*self.served.adapters, adapter))
        return adapter

    async def unload_adapter(self, name: str) -> None:
        if self.served.adapter(name) is None or name in (BASE, FINETUNED):
            raise UnknownModel(f"no adapter is served as {name!r}")
        if name == self.served.default:
            raise AdapterRejected(f"{name!r} is the default adapter: make another the default")
        adapters = tuple(a for a in self.served.adapters if a.name != name)
        self.served = dataclasses.replace(self.served, adapters=adapters)

    async def set_default(self, name: str) -> ServedModels:
        if self.served.adapter(name) is None or name in (BASE, FINETUNED):
            raise UnknownModel(f"no adapter is served as {name!r}")
        self.served = dataclasses.replace(self.served, default=name)
        return self.served
