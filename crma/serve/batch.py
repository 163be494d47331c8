"""The running batch's KV cache: preallocated per batch slot, left-padded, written in place.

    slots:  r0  [pad pad  k  k  k  k | . . . ]     mask (slots, capacity): 0 = padding, 1 = a real token
            r1  [ k   k   k  k  k  k | . . . ]     position of r's next token = its number of real tokens
            r2  [pad  k   k  k  k  k | . . . ]     T = 6 columns used, the rest preallocated

Every decoder layer keeps keys and values in (slots, kv heads, capacity, head dim) buffers. A
decoding step writes each row's new key/value into column T in place (`SlotLayer.update`: no
per-step torch.cat of the whole cache) and attends over the view [:rows, :, :T + 1]; the mask's
column T is set and the positions advance in place. The buffers double (one copy) when the columns or
the slots run out. Requests are prefilled into a transformers DynamicCache (prefill.py: several rows
at once, padding wherever the mask says), then copied into the next free slots, right-aligned with
the batch's columns: when a prompt is longer than T, the batch is shifted right once. Finished rows
are dropped by compacting the live slots to the front, cutting padding columns no row needs any more.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


def new_cache(config) -> DynamicCache:
    """An empty cache for one prefill; refuses models whose cache is not plain full attention
    (sliding-window or linear-attention layers keep state this module cannot pad or merge)."""
    cache = DynamicCache(config=config)
    odd = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if odd:
        raise ValueError(f"crma serve batches full-attention decoder caches only; this model's cache has {sorted(odd)} "
                         "layers (sliding-window or linear attention)")
    return cache


def _capacity(n: int, have: int) -> int:
    """Room for n: at least double what there is (amortised copies), a multiple of 64 columns."""
    return max(n, 2 * have, 64) + (-max(n, 2 * have, 64)) % 64


class SlotLayer(DynamicLayer):
    """One decoder layer's keys and values for every batch slot: (slots, heads, capacity, head dim)."""

    def __init__(self, batch: BatchCache, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.batch, self.keys, self.values = batch, keys, values     # keys, values: (slots, h, capacity, hd)
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the rows' new (b, h, s, hd) keys/values at columns [T, T + s) in place; return the views
        (b, h, T + s, hd) attention reads."""
        b, t, s = key_states.shape[0], self.batch.length, key_states.shape[2]
        self.keys[:b, :, t:t + s] = key_states
        self.values[:b, :, t:t + s] = value_states
        return self.keys[:b, :, :t + s], self.values[:b, :, :t + s]

    def get_seq_length(self) -> int:
        return self.batch.length

    def get_max_length(self) -> int:
        return self.keys.shape[2]

    def resize(self, slots: int, capacity: int) -> None:
        """Larger buffers holding what is there (new room zero: padding must stay finite)."""
        s, h, c, hd = self.keys.shape
        keys, values = self.keys.new_zeros(slots, h, capacity, hd), self.values.new_zeros(slots, h, capacity, hd)
        keys[:s, :, :c], values[:s, :, :c] = self.keys, self.values
        self.keys, self.values = keys, values


class BatchCache:
    """KV cache, padding mask and next positions of the rows of the running batch (slots [0, len))."""

    def __init__(self):
        self.cache: Cache | None = None
        self.rows = 0                                  # live slots
        self.length = 0                                # T: columns in use
        self.mask: torch.Tensor | None = None          # (slots, capacity) long, 1 = real token
        self.pos: torch.Tensor | None = None           # (slots,) long: real tokens per slot

    def __len__(self) -> int:
        return self.rows

    def _reserve(self, slots: int, columns: int) -> None:
        have_slots, have_cols = self.mask.shape
        if slots <= have_slots and columns <= have_cols:
            return
        new_slots = have_slots if slots <= have_slots else max(slots, 2 * have_slots)
        new_cols = have_cols if columns <= have_cols else _capacity(columns, have_cols)
        for layer in self.cache.layers:
            layer.resize(new_slots, new_cols)
        mask = self.mask.new_zeros(new_slots, new_cols)
        mask[:have_slots, :have_cols] = self.mask
        pos = self.pos.new_zeros(new_slots)
        pos[:have_slots] = self.pos
        self.mask, self.pos = mask, pos

    def add(self, cache: DynamicCache, mask: torch.Tensor, rows: list[int]) -> None:
        """Copy rows `rows` of a prefilled cache (n, h, L, hd) with its mask (n, L) (1 = a real token; padding
        may sit anywhere, batched prefill leaves it between a reused prefix and the row's own tokens) into
        the next free slots, right-aligned with the batch's columns; padding columns' keys/values zeroed."""
        if not rows:
            return
        length = mask.shape[1]
        if self.cache is None:
            ref = cache.layers[0].keys                                                 # (n, h, L, hd)
            cols = _capacity(length + 1, 0)
            self.cache = Cache(layers=[
                SlotLayer(self, layer.keys.new_zeros(1, ref.shape[1], cols, layer.keys.shape[3]),
                          layer.values.new_zeros(1, ref.shape[1], cols, layer.values.shape[3]))
                for layer in cache.layers])
            self.mask = torch.zeros(1, cols, dtype=torch.long, device=ref.device)
            self.pos = torch.zeros(1, dtype=torch.long, device=ref.device)
        b, t, n = self.rows, self.length, len(rows)
        self._reserve(b + n, max(t, length) + 1)
        if length > t:                                 # longer prompts: shift the batch right once
            grow = length - t
            for layer in self.cache.layers:
                for buf in (layer.keys, layer.values):
                    buf[:b, :, grow:length] = buf[:b, :, :t].clone()
                    buf[:b, :, :grow] = 0
            self.mask[:b, grow:length] = self.mask[:b, :t].clone()
            self.mask[:b, :grow] = 0
            t = self.length = length
        index = torch.tensor(rows, dtype=torch.long, device=mask.device)
        real = mask.index_select(0, index)                                             # (n, L)
        keep = real.bool()[:, None, :, None]                                           # (n, 1, L, 1)
        pad = t - length
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            for buf, src in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                buf[b:b + n, :, :pad] = 0
                buf[b:b + n, :, pad:t] = torch.where(keep, src.index_select(0, index), 0)
        self.mask[b:b + n, :pad] = 0
        self.mask[b:b + n, pad:t] = real
        self.pos[b:b + n] = real.sum(1)
        self.rows = b + n

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in this order) in slots [0, len(rows)); cut padding columns every one of them has."""
        if not rows:
            self.cache, self.mask, self.pos, self.rows, self.length = None, None, None, 0, 0
            return
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        t, n = self.length, len(rows)
        mask = self.mask[:, :t].index_select(0, index)                                 # (n, T)
        start = int(mask.any(0).long().argmax())                                       # first column still used
        for layer in self.cache.layers:
            for buf in (layer.keys, layer.values):
                buf[:n, :, : t - start] = buf[:, :, start:t].index_select(0, index)
        self.mask[:n, : t - start] = mask[:, start:]
        self.pos[:n] = self.pos.index_select(0, index)
        self.rows, self.length = n, t - start

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention_mask (b, T + 1), position_ids (b, 1)) for one new token per row: views of the
        preallocated mask and positions, the new column set in place."""
        self._reserve(self.rows, self.length + 1)
        self.mask[: self.rows, self.length] = 1
        return self.mask[: self.rows, : self.length + 1], self.pos[: self.rows].unsqueeze(1)

    def stepped(self) -> None:
        """Record the step the model just took (it wrote one key/value column for every row)."""
        self.pos[: self.rows] += 1
        self.length += 1
