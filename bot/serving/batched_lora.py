"""Batched LoRA: every row's adapter applied by one gathered product per layer, whatever the mix.

peft routes a mixed batch by looping, in every LoRA layer, over the
adapters present: select their rows, run A and B, scatter the result back.
The cost grows with the number of distinct adapters in a step (four mixed
ran at half the speed of one). Punica and S-LoRA instead stack the
adapters' factors and gather each row's: here every LoRA layer holds
``A`` as ``[adapters + 1, r_max, in]`` and ``B`` (times the adapter's
scale) as ``[adapters + 1, out, r_max]``, slot 0 all zeros for the base, and
a forward hook adds ``x · A[slot]ᵀ · B[slot]ᵀ`` per row with two batched
products, the adapters' ranks zero-padded to the largest. A trained module
copy (``modules_to_save``, e.g. ``lm_head``) is run for its rows only.

The model's adapters are turned off while the hooks run, so each layer's
base output is the model's own and the hooks add the rest. Every step with
an adapter goes this way, a single adapter's too, so an answer computed
alone and in any mix goes through the same arithmetic. Layouts peft can
make that this does not cover (DoRA, LoRA on embeddings or convolutions, a
LoRA bias) leave :meth:`BatchedLora.build` returning None, and the runner
keeps peft's routing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(eq=False)
class _Stacked:
    """One LoRA layer's factors of every adapter, by slot (0: none)."""

    a: torch.Tensor  # [slots, r_max, in]
    b: torch.Tensor  # [slots, out, r_max], scaled


@dataclass(eq=False)
class _Copies:
    """One ``modules_to_save`` wrapper's copies, by slot (None: the original module)."""

    modules: list[Any]


@dataclass(eq=False)
class _Factors:
    """One adapter's factors in one LoRA layer, as peft holds them, and the slot they go to."""

    slot: int
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r], unscaled
    scale: float
    size: tuple[int, int]  # the layer's (in, out) features


class BatchedLora:
    """The stacked adapters of one model and the hooks that apply them per row."""

    def __init__(
        self, slots: dict[str, int], layers: dict[Any, _Stacked], copies: dict[Any, _Copies]
    ):
        self.slots = slots  # adapter name → slot; slot 0 is the base
        self._layers = layers
        self._copies = copies
        self._rows: torch.Tensor | None = None  # each row's slot, for the step being run
        self._copy_rows: list[tuple[int, torch.Tensor]] = []  # slots with rows, and their rows
        self._hooks: list[Any] = []

    @classmethod
    def build(cls, model: Any, names: Sequence[str]) -> BatchedLora | None:
        """Stack ``names``' factors over every LoRA layer of ``model``; None if a layout is not covered."""
        stacking = cls.stacking(model, names)
        return stacking.build() if stacking else None

    @classmethod
    def stacking(
        cls, model: Any, names: Sequence[str], onto: BatchedLora | None = None
    ) -> Stacking | None:
        """What stacking ``names`` onto ``onto``'s adapters takes; None if a layout is not covered.

        Only this walk over the model's modules needs the model's thread (it
        collects references, copies nothing); :meth:`Stacking.build`, the
        allocations and copies that grow with every adapter's size, runs on
        any thread while the model keeps decoding with ``onto``.
        """
        import torch
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper

        if not isinstance(model, torch.nn.Module):
            return None
        all_names = [
            *(onto.slots if onto else ()),
            *(n for n in names if not onto or n not in onto.slots),
        ]
        added: dict[Any, list[_Factors]] = {}
        copies: dict[Any, _Copies] = {}
        module: Any
        for module in model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                own = module.modules_to_save
                copies[module] = _Copies(
                    [None]
                    + [
                        own[n] if n in own and own[n] is not module.original_module else None
                        for n in all_names
                    ]
                )
                continue
            if not isinstance(module, LoraLayer):
                continue
            present = [n for n in all_names[len(onto.slots) if onto else 0 :] if n in module.lora_A]
            if (
                module.lora_embedding_A
                or any(module.use_dora.get(n) or module.lora_bias.get(n) for n in present)
                or any(not isinstance(module.lora_A[n], torch.nn.Linear) for n in present)
            ):
                return None
            layer: Any = module  # peft types its sub-layers loosely
            if present:
                added[module] = [
                    _Factors(
                        slot=all_names.index(n) + 1,
                        a=layer.lora_A[n].weight,
                        b=layer.lora_B[n].weight,
                        scale=layer.scaling[n],
                        size=(layer.in_features, layer.out_features),
                    )
                    for n in present
                ]
        return Stacking(onto, {n: i + 1 for i, n in enumerate(all_names)}, added, copies)

    @property
    def nbytes(self) -> int:
        """What the stacks hold, in bytes (each adapter's factors are also in peft's layers)."""
        return sum(s.a.nbytes + s.b.nbytes for s in self._layers.values())

    def hold(self, names: Sequence[str], device: Any) -> None:
        """Apply each of ``names`` (one per row; the base's is not in ``slots``) from now on."""
        import torch

        slots = [self.slots.get(n, 0) for n in names]
        self._rows = torch.tensor(slots, device=device)
        self._copy_rows = [
            (slot, torch.tensor([i for i, s in enumerate(slots) if s == slot], device=device))
            for slot in sorted(set(slots))
        ]
        if not self._hooks:
            for layer in self._layers:
                self._hooks.append(layer.register_forward_hook(self._add_delta))
            for wrapper in self._copies:
                self._hooks.append(wrapper.register_forward_hook(self._run_copies))

    def release(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._rows = None

    def _add_delta(self, layer: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        import torch

        assert self._rows is not None
        stacked = self._layers[layer]
        x = args[0].to(stacked.a.dtype)
        low = torch.bmm(x, stacked.a[self._rows].transpose(1, 2))
        return output + torch.bmm(low, stacked.b[self._rows].transpose(1, 2)).to(output.dtype)

    def _run_copies(
        self, wrapper: Any, args: tuple[Any, ...], output: torch.Tensor
    ) -> torch.Tensor:
        copies = self._copies[wrapper].modules
        x = args[0]
        for slot, rows in self._copy_rows:
            copy = copies[slot]
            if copy is not None:
                output = output.index_copy(0, rows, copy(x[rows]))
        return output


@dataclass(eq=False)
class Stacking:
    """Adapters to stack onto a :class:`BatchedLora` (or onto none): references, nothing copied yet.

    :meth:`build` reads only these references and ``onto``'s stacks, which
    nothing changes once made, so it is safe off the model's thread; the
    result serves the same rows the same way whichever adapters were
    stacked first (each slice is the layer's own factors, the rest zeros).
    """

    onto: BatchedLora | None
    slots: dict[str, int]
    added: dict[Any, list[_Factors]]  # LoRA layer → the new adapters' factors in it
    copies: dict[Any, _Copies]
    built: BatchedLora | None = None  # what build made, kept for whoever swaps it in

    def build(self) -> BatchedLora:
        """The new stacks: ``onto``'s, copied, and every added adapter's slice."""
        import torch

        old = self.onto._layers if self.onto else {}
        count = len(self.slots) + 1
        layers: dict[Any, _Stacked] = {}
        for layer in [*old, *(layer for layer in self.added if layer not in old)]:
            kept, factors = old.get(layer), self.added.get(layer, [])
            like = kept.a if kept is not None else factors[0].a
            in_features, out_features = (
                (kept.a.shape[2], kept.b.shape[1]) if kept is not None else factors[0].size
            )
            r_max = max([kept.a.shape[1]] if kept is not None else [], default=0)
            r_max = max([r_max, *(f.a.shape[0] for f in factors)])
            with torch.inference_mode():  # as the passes that read them
                a = like.new_zeros(count, r_max, in_features)
                b = like.new_zeros(count, out_features, r_max)
                if kept is not None:
                    slots, rank = kept.a.shape[:2]
                    a[:slots, :rank] = kept.a
                    b[:slots, :, :rank] = kept.b
                for f in factors:
                    r = f.a.shape[0]
                    a[f.slot, :r] = f.a
                    b[f.slot, :, :r] = f.b * f.scale
            layers[layer] = _Stacked(a, b)
        self.built = BatchedLora(dict(self.slots), layers, dict(self.copies))
        return self.built
