"""Batched prefill with shared prompt prefixes reused: the requests admitted in one scheduler step are
read in a few forwards (bucketed by length), each row with its own adapter and backbone version.

Prefix reuse: the KV of a prompt depends on its tokens and on the row's adapter and backbone version
(LoRA on the projections, CRMA on every block's output), so it is kept per route key (adapter, backbone
version), in blocks of BLOCK tokens: after a prefill, the prompt's first BLOCK * j tokens (j as large as
leaves one token to read) are stored, indexed by the chained hash of every block-aligned prefix. A
later prompt with the same route key and a stored prefix (typically the chat template's system prompt)
reads only its remaining tokens. Entries are evicted least recently used beyond a byte budget.

A bucket's forward, rows left-padded twice (masked columns are 0, their KV zeroed afterwards):

    columns:  [ pad | reused prefix p_i ][ pad | own tokens s_i ]      P = max p_i, S = max s_i
    row i:    mask 1 on its p_i prefix columns and its s_i token columns, positions p_i .. p_i + s_i - 1

so every row attends to exactly its own prompt at its own positions, as it would alone; the logits of
the last column are every row's next-token scores.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .batch import new_cache

BLOCK = 8                 # tokens per prefix block: SmolLM2's chat template system prompt is ~3 blocks
BUCKET_TOKENS = 128       # padded tokens per prefill forward at most (TTFT p50 vs total prefill time)


@dataclass(eq=False)
class _Entry:
    ids: tuple[int, ...]                  # the stored prefix's tokens
    keys: list[torch.Tensor]              # per layer (kv heads, n, head dim)
    values: list[torch.Tensor]
    index: list[tuple]                    # its keys in PrefixCache.index
    nbytes: int


@dataclass
class Past:
    """A row's reused prefix: `length` tokens whose per-layer keys/values are (heads, length, hd)."""
    length: int = 0
    keys: list[torch.Tensor] | None = None
    values: list[torch.Tensor] | None = None


def _chain(ids: list[int], blocks: int) -> list[int]:
    """Hash of every block-aligned prefix: h_j = hash((h_{j-1}, block j)), j = 1..blocks."""
    out, h = [], 0
    for j in range(blocks):
        h = hash((h, tuple(ids[j * BLOCK:(j + 1) * BLOCK])))
        out.append(h)
    return out


class PrefixCache:
    """Stored prompt-prefix KV per route key, least recently used evicted beyond `budget` bytes (0: off)."""

    def __init__(self, budget: int):
        self.budget, self.nbytes = budget, 0
        self.entries: OrderedDict[int, _Entry] = OrderedDict()
        self.index: dict[tuple, tuple[_Entry, int]] = {}     # (route key, chain hash) -> (entry, prefix length)
        self.hits = self.reused_tokens = 0

    def lookup(self, key, ids: list[int]) -> Past:
        """The longest stored block-aligned prefix of `ids` (leaving at least one token to read)."""
        if not self.budget:
            return Past()
        for j, h in reversed(list(enumerate(_chain(ids, (len(ids) - 1) // BLOCK), 1))):
            hit = self.index.get((key, h))
            if hit is not None and hit[0].ids[: j * BLOCK] == tuple(ids[: j * BLOCK]):
                entry, n = hit[0], j * BLOCK
                self.entries.move_to_end(id(entry))
                self.hits, self.reused_tokens = self.hits + 1, self.reused_tokens + n
                return Past(n, [k[:, :n] for k in entry.keys], [v[:, :n] for v in entry.values])
        return Past()

    def wants(self, key, ids: list[int]) -> bool:
        """Whether store() would keep something of this prompt (worth extracting its keys/values)."""
        blocks = (len(ids) - 1) // BLOCK
        if not self.budget or blocks == 0:
            return False
        last = self.index.get((key, _chain(ids, blocks)[-1]))
        return last is None or last[1] != blocks * BLOCK

    def store(self, key, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep the first BLOCK * j tokens' per-layer (heads, >= n, hd) keys/values of a prompt just read."""
        blocks = (len(ids) - 1) // BLOCK
        if not self.budget or blocks == 0:
            return
        hashes = _chain(ids, blocks)
        last = self.index.get((key, hashes[-1]))
        if last is not None and last[1] == blocks * BLOCK:          # stored already
            self.entries.move_to_end(id(last[0]))
            return
        n = blocks * BLOCK
        entry = _Entry(tuple(ids[:n]), [k[:, :n].clone() for k in keys], [v[:, :n].clone() for v in values],
                       [(key, h) for h in hashes], 0)
        entry.nbytes = sum(t.numel() * t.element_size() for t in (*entry.keys, *entry.values))
        if entry.nbytes > self.budget:
            return
        for j, name in enumerate(entry.index, 1):
            self.index[name] = (entry, j * BLOCK)
        self.entries[id(entry)] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.budget:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes
            for name in old.index:
                if self.index.get(name, (None,))[0] is old:
                    del self.index[name]

    def clear(self) -> None:
        self.entries.clear()
        self.index.clear()
        self.nbytes = 0


def buckets(lengths: list[int], slack: float = 1.5, extra: int = 16, tokens: int = BUCKET_TOKENS) -> list[list[int]]:
    """Indices grouped by similar length (sorted; a bucket's longest <= max(slack * shortest, shortest + extra)),
    so that padding stays small, and at most `tokens` padded tokens per bucket (beyond a few hundred tokens
    a forward is no cheaper per token, and the bucket's first tokens wait for all of it)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and lengths[i] <= max(slack * lengths[out[-1][0]], lengths[out[-1][0]] + extra) \
                and lengths[i] * (len(out[-1]) + 1) <= tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def prefill(forward, config, routes: list, prompts: list[list[int]], pasts: list[Past], device,
            pad_id: int = 0) -> tuple[torch.Tensor, object, torch.Tensor]:
    """Read the rows' prompts in one forward: (next-token logits (b, vocab), the DynamicCache (b, h, P + S, hd),
    its mask (b, P + S) long, 1 = a real token of that row)."""
    b = len(prompts)
    big_p = max(p.length for p in pasts)
    s = max(len(ids) - p.length for ids, p in zip(prompts, pasts, strict=True))
    ids = torch.full((b, s), pad_id, dtype=torch.long, device=device)                 # (b, S)
    positions = torch.zeros(b, s, dtype=torch.long, device=device)                    # (b, S)
    mask = torch.zeros(b, big_p + s, dtype=torch.long, device=device)                 # (b, P + S)
    for i, (prompt, past) in enumerate(zip(prompts, pasts, strict=True)):
        own = prompt[past.length:]
        ids[i, s - len(own):] = torch.tensor(own, dtype=torch.long, device=device)
        positions[i, s - len(own):] = torch.arange(past.length, len(prompt), device=device)
        mask[i, big_p - past.length: big_p] = 1
        mask[i, big_p + s - len(own):] = 1
    cache = new_cache(config)
    if big_p:
        ref = next(p for p in pasts if p.length)
        for layer, (k0, v0) in enumerate(zip(ref.keys, ref.values, strict=True)):
            keys = k0.new_zeros(b, k0.shape[0], big_p, k0.shape[2])                   # (b, h, P, hd)
            values = v0.new_zeros(b, v0.shape[0], big_p, v0.shape[2])
            for i, past in enumerate(pasts):
                if past.length:
                    keys[i, :, big_p - past.length:] = past.keys[layer]
                    values[i, :, big_p - past.length:] = past.values[layer]
            cache.update(keys, values, layer)
    logits = forward(ids, routes, cache, attention_mask=mask, position_ids=positions)  # (b, vocab)
    return logits, cache, mask
