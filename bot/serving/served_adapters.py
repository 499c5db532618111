"""Which adapters a worker serves: the names that take requests, those on their way in or out,
and the one ``finetuned`` means.

Callers on any thread reserve a name before loading, resolve a request's
model to an adapter when it is submitted, mark an adapter for unloading and
promote another; the worker's thread adds an adapter once it can answer and
removes one once no row uses it. All of it under the worker's one lock, so a
request is never given an adapter that is already on its way out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection

from bot.serving.adapters import BASE, FINETUNED
from bot.serving.engine import AdapterRejected, UnknownModel, Variant

# Told how an adapter change went: None once it is done, else why it failed.
OnAdapterDone = Callable[[BaseException | None], None]


class ServedAdapters:
    """The served-adapter table; ``lock`` is the worker's (re-entrant) condition."""

    def __init__(
        self,
        names: list[str],
        default: str | None,
        *,
        max_adapters: int,
        lock: threading.Condition,
    ) -> None:
        self._names = list(names)  # answering, in load order (with those being unloaded)
        self._loading: set[str] = set()  # names taken by loads in progress
        self._unloading: dict[str, OnAdapterDone] = {}  # refused to new requests, rows finishing
        self._default = default or (self._names[0] if self._names else None)
        if self._default is not None and self._default not in self._names:
            raise ValueError(f"default adapter {self._default!r} is not one of {self._names}")
        self.max_adapters = max_adapters
        self._lock = lock

    # ---- callers (any thread) -----------------------------------------------------------

    def resolve(self, model: Variant) -> str | None:
        """The adapter a request for ``model`` runs with (None: the base), or UnknownModel."""
        with self._lock:
            if model == BASE:
                return None
            name = self._default if model == FINETUNED else model
            if name is not None and name in self._names and name not in self._unloading:
                return name
            if model == FINETUNED:
                raise UnknownModel(
                    "no finetuned adapter is loaded (ADAPTER_PATH is unset): ask the base model"
                )
            served = [BASE, FINETUNED] if self._default else [BASE]
            served += self.names()
            raise UnknownModel(f"no model is served as {model!r}: ask one of {', '.join(served)}")

    def names(self) -> list[str]:
        """The adapters that take requests now (loaded, not being unloaded), in load order."""
        with self._lock:
            return [n for n in self._names if n not in self._unloading]

    @property
    def default(self) -> str | None:
        return self._default

    def reserve(self, name: str) -> None:
        """Take ``name`` for an adapter about to be loaded, or say why it cannot be."""
        with self._lock:
            if name in self._names or name in self._loading:
                raise AdapterRejected(
                    f"an adapter named {name!r} is already served: unload it first or pick another name"
                )
            if len(self._names) + len(self._loading) >= self.max_adapters:
                raise AdapterRejected(
                    f"{self.max_adapters} adapters are served already (MAX_ADAPTERS): unload one first"
                )
            self._loading.add(name)

    def release(self, name: str) -> None:
        """Give back a name :meth:`reserve` took for a load that did not happen."""
        with self._lock:
            self._loading.discard(name)

    def mark_unloading(self, name: str, on_done: OnAdapterDone) -> None:
        """Refuse ``name`` to new requests now; ``on_done`` hears once it is deleted."""
        with self._lock:
            if name not in self._names or name in self._unloading:
                raise UnknownModel(f"no adapter is served as {name!r}")
            if name == self._default:
                raise AdapterRejected(
                    f"{name!r} is the default adapter ('finetuned'): make another the default first"
                )
            self._unloading[name] = on_done

    def set_default(self, name: str) -> None:
        """Make ``name`` the adapter of every ``finetuned`` request resolved from now on."""
        with self._lock:
            if name not in self._names or name in self._unloading:
                raise UnknownModel(f"no adapter is served as {name!r}")
            self._default = name

    # ---- the worker's thread ------------------------------------------------------------

    def serve(self, name: str) -> None:
        """A reserved adapter can answer: it takes requests from now on."""
        with self._lock:
            self._loading.discard(name)
            self._names.append(name)
            if self._default is None:  # the first adapter of a base-only server
                self._default = name

    @property
    def unloading(self) -> bool:
        return bool(self._unloading)

    def unused_unloading(self, in_use: Collection[str]) -> list[str]:
        """The adapters being unloaded that no row in ``in_use`` runs on any more."""
        with self._lock:
            return [n for n in self._unloading if n not in in_use]

    def unloaded(self, name: str, *, deleted: bool) -> OnAdapterDone:
        """``name``'s unloading is over (deleted, or failed and still served); whom to tell."""
        with self._lock:
            on_done = self._unloading.pop(name)
            if deleted:
                self._names.remove(name)
            return on_done

    def abandon_unloading(self) -> list[OnAdapterDone]:
        """The worker has stopped: the unloads still waiting will not happen; whom to tell."""
        with self._lock:
            waiting, self._unloading = list(self._unloading.values()), {}
            return waiting
