"""The running batch: one KV cache for every row in decoding, rows joining and leaving between steps.

Iteration-level scheduling (the idea of Orca, and of the causal-LM server in
text-generation-inference) needs three operations ``generate`` does not
offer: *prefill* a group of new prompts into a cache of their own,
*concatenate* it with the running batch, and *keep* only some rows when
others finish. transformers' ``DynamicCache`` holds per-layer keys and
values ``[rows, heads, length, dim]``; it has no concatenation, so this
module pads each side on the left to the longer length and joins them.

Every row is left-padded: its tokens end at the last column, so the one
token each row feeds per step lines up. The attention mask marks padding,
and each row keeps its own position ids — the count of its real tokens, not
the cache's column — so rotary position embeddings see the positions the row
would see alone. Getting a position wrong corrupts the answer silently;
tests compare a row joining mid-way with the same row alone, token for token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# forward(rows, input_ids, attention_mask, position_ids, cache) → logits of each row's last position
Forward = Callable[
    [Sequence[Any], "torch.Tensor", "torch.Tensor", "torch.Tensor", Any], "torch.Tensor"
]


class DecodeBatch:
    """Rows in decoding: the cache, the mask over its columns and what each row feeds next.

    ``rows`` are the caller's objects, in the order of the tensors' first
    dimension; this class never looks inside them.
    """

    def __init__(
        self,
        rows: list[Any],
        cache: Any,
        mask: torch.Tensor,
        positions: torch.Tensor,
        seen: torch.Tensor,
    ) -> None:
        self.rows = rows
        self.cache = cache
        self.mask = mask  # [rows, length] 1 = a real token in that cache column
        self.positions = positions  # [rows] position id of the token each row feeds next
        self.seen = seen  # [rows, vocab] tokens each row holds, for the repetition penalty
        self.next_tokens: torch.Tensor | None = None  # [rows], set by the caller after each step

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    @property
    def tokens_held(self) -> int:
        """Cache slots in use, padding included: rows × length."""
        return len(self.rows) * self.length

    @classmethod
    def prefill(
        cls,
        rows: list[Any],
        token_ids: Sequence[Sequence[int]],
        *,
        pad_id: int,
        device: Any,
        forward: Forward,
    ) -> tuple[DecodeBatch, torch.Tensor]:
        """Run the prompts (``token_ids``, one list per row) and return the batch and each row's
        logits for its first new token."""
        import torch
        from transformers import DynamicCache

        length = max(len(ids) for ids in token_ids)
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, ids in enumerate(token_ids):
            input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[row, length - len(ids) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        cache = DynamicCache()
        logits = forward(rows, input_ids, mask, position_ids, cache)
        vocab = int(logits.shape[-1])
        marked = input_ids.masked_fill(mask == 0, vocab)  # padding lands in a column cut off below
        seen = torch.zeros((len(rows), vocab + 1), dtype=torch.bool, device=device)
        seen.scatter_(1, marked, True)
        batch = cls(list(rows), cache, mask, mask.sum(dim=1), seen[:, :vocab].contiguous())
        return batch, logits

    def step(self, forward: Forward) -> torch.Tensor:
        """Feed every row its next token; the logits of each row's following one."""
        import torch

        assert self.next_tokens is not None, "choose the rows' tokens before the next step"
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        logits = forward(
            self.rows, self.next_tokens[:, None], self.mask, self.positions[:, None], self.cache
        )
        self.positions = self.positions + 1
        return logits

    def take(self, tokens: torch.Tensor) -> None:
        """The tokens just chosen: each row feeds its own next, and holds it from now on."""
        import torch

        self.next_tokens = tokens
        self.seen[torch.arange(len(self.rows), device=tokens.device), tokens] = True

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only the rows at ``indices`` and drop the cache columns none of them uses."""
        import torch

        if list(indices) == list(range(len(self.rows))):
            return
        index = torch.tensor(list(indices), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0)
        start = int(used.int().argmax()) if bool(used.any()) else mask.shape[1]
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)
        self.seen = self.seen.index_select(0, index)
        if self.next_tokens is not None:
            self.next_tokens = self.next_tokens.index_select(0, index)
        self.rows = [self.rows[i] for i in indices]
        self.cache = _rebuild(
            (keys.index_select(0, index)[:, :, start:], values.index_select(0, index)[:, :, start:])
            for keys, values in _release(self.cache)
        )

    @classmethod
    def concatenate(cls, first: DecodeBatch, second: DecodeBatch) -> DecodeBatch:
        """One batch of ``first``'s rows then ``second``'s, both left-padded to the longer length."""
        import torch

        length = max(first.length, second.length)

        def pad(tensor: torch.Tensor, dim: int) -> torch.Tensor:
            missing = length - tensor.shape[dim]
            if missing == 0:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        def layers() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for (k1, v1), (k2, v2) in zip(
                _release(first.cache), _release(second.cache), strict=True
            ):
                yield (
                    torch.cat([pad(k1, 2), pad(k2, 2)], dim=0),
                    torch.cat([pad(v1, 2), pad(v2, 2)], dim=0),
                )

        joined = cls(
            first.rows + second.rows,
            _rebuild(layers()),
            torch.cat([pad(first.mask, 1), pad(second.mask, 1)], dim=0),
            torch.cat([first.positions, second.positions]),
            torch.cat([first.seen, second.seen]),
        )
        if first.next_tokens is not None and second.next_tokens is not None:
            joined.next_tokens = torch.cat([first.next_tokens, second.next_tokens])
        return joined


def _release(cache: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values, dropping the cache's own reference as it goes, so a
    rebuild holds about one copy of the cache at a time, not two."""
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        layer.keys = layer.values = None
        yield keys, values


def _rebuild(layers: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers)
