"""The running batch's KV cache: one left-padded transformers DynamicCache shared by every row.

    rows:   r0  [pad pad  k  k  k  k ]       mask (b, T): 0 = padding, 1 = a real token
            r1  [ k   k   k  k  k  k ]       position of r's next token = its number of real tokens
            r2  [pad  k   k  k  k  k ]

A request is prefilled alone (batch 1, no padding), then joins: its cache is left-padded to the
batch's length T (or the batch is left-padded to its length) and concatenated on the batch axis.
A decoding step feeds one token per row with `attention_mask` = [mask, 1] and per-row position ids,
so every row attends to exactly its own tokens at its own positions, as it would alone. Finished
rows are dropped by index, and padding columns no row needs any more are cut off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def new_cache(config) -> DynamicCache:
    """An empty cache for one prefill; refuses models whose cache is not plain full attention
    (sliding-window or linear-attention layers keep state this module cannot pad or merge)."""
    cache = DynamicCache(config=config)
    odd = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if odd:
        raise ValueError(f"crma serve batches full-attention decoder caches only; this model's cache has {sorted(odd)} "
                         "layers (sliding-window or linear attention)")
    return cache


class BatchCache:
    """KV cache, padding mask and next positions of the rows of the running batch."""

    def __init__(self):
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None          # (b, T) long, 1 = real token
        self.positions: list[int] = []                 # per row: real tokens in its cache

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, row: DynamicCache, length: int) -> None:
        """Append a prefilled single-row cache holding `length` tokens as the batch's last row."""
        if self.cache is None:
            self.cache = row
            self.mask = torch.ones(1, length, dtype=torch.long, device=row.layers[0].keys.device)
            self.positions = [length]
            return
        total = max(self.length, length)
        grow, pad = total - self.length, total - length
        for mine, theirs in zip(self.cache.layers, row.layers, strict=False):
            mine.keys = torch.cat([_left_pad(mine.keys, grow), _left_pad(theirs.keys, pad)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, grow), _left_pad(theirs.values, pad)], dim=0)
        new = torch.cat([torch.zeros(1, pad, dtype=torch.long, device=self.mask.device),
                         torch.ones(1, length, dtype=torch.long, device=self.mask.device)], dim=1)
        self.mask = torch.cat([F.pad(self.mask, (grow, 0)), new], dim=0)
        self.positions.append(length)

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in this order); cut padding columns that every remaining row has."""
        if not rows:
            self.cache, self.mask, self.positions = None, None, []
            return
        if rows == list(range(len(self))):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(0).long().argmax())           # first column some row still uses
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.mask = mask[:, start:]
        self.positions = [self.positions[r] for r in rows]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention_mask (b, T + 1), position_ids (b, 1)) for one new token per row."""
        mask = F.pad(self.mask, (0, 1), value=1)
        positions = torch.tensor(self.positions, dtype=torch.long, device=mask.device).unsqueeze(1)
        return mask, positions

    def stepped(self) -> None:
        """Record the step the model just took (it appended one key/value column to every row)."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        self.positions = [p + 1 for p in self.positions]


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """(b, heads, T, hd) -> (b, heads, n + T, hd) with n zero columns in front."""
    return t if n == 0 else F.pad(t, (0, 0, n, 0))
