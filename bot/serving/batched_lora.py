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
        import torch
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper

        if not isinstance(model, torch.nn.Module):
            return None
        slots = {name: i + 1 for i, name in enumerate(names)}
        layers: dict[Any, _Stacked] = {}
        copies: dict[Any, _Copies] = {}
        module: Any
        for module in model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                own = module.modules_to_save
                copies[module] = _Copies(
                    [None]
                    + [
                        own[n] if n in own and own[n] is not module.original_module else None
                        for n in names
                    ]
                )
                continue
            if not isinstance(module, LoraLayer):
                continue
            present = [n for n in names if n in module.lora_A]
            if (
                module.lora_embedding_A
                or any(module.use_dora.get(n) or module.lora_bias.get(n) for n in present)
                or any(not isinstance(module.lora_A[n], torch.nn.Linear) for n in present)
            ):
                return None
            weight: Any = module.lora_A[present[0]].weight if present else None
            if weight is None:
                continue
            r_max = max(module.r[n] for n in present)
            a = weight.new_zeros(len(names) + 1, r_max, module.in_features)
            b = weight.new_zeros(len(names) + 1, module.out_features, r_max)
            for n in present:
                r = module.r[n]
                a[slots[n], :r] = module.lora_A[n].weight
                b[slots[n], :, :r] = module.lora_B[n].weight * module.scaling[n]
            layers[module] = _Stacked(a, b)
        return cls(slots, layers, copies)

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
