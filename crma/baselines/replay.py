"""Experience replay on one shared LoRA adapter, with a reservoir-sampled buffer of earlier passages.

Chaudhry, Rohrbach, Elhoseiny, et al., "On Tiny Episodic Memories in Continual Learning", arXiv
1902.10486, 2019 (experience replay with a reservoir buffer); reservoir sampling is Vitter's Algorithm R
(ACM TOMS 11(1), 1985). The buffer M (at most K passages) is a uniform sample of every passage of the
earlier domains, in the order they were seen:

    the n-th passage seen (n = 0, 1, ...):  n < K: keep it;  else j ~ U{0..n}: if j < K, it replaces M[j]

Phase t > 0 trains on its own passages in the run's seeded order (the same as every condition) with
buffer passages interleaved at ratio rho: after every new passage a credit rho / (1 - rho) accrues, and
each whole unit of credit inserts one passage drawn from M (without replacement until M is used up, then
again). So a fraction rho of the phase's passages are replayed (rho = 0.25, batch 4: 3 new + 1 old),
every new passage is still seen, and the phase takes 1 / (1 - rho) times the steps. Deterministic given
the seed. Phase 0 has an empty buffer: it is naive's phase 0, to the bit.

Stores the buffer as text: up to K earlier-domain passages (storage(): count, bytes, per domain). That is
the privacy cost the modular setup avoids.
"""
from __future__ import annotations

import random
from collections import Counter

from ..data import epoch_order
from .base import Baseline


class Reservoir:
    """At most `size` items, each a uniform draw from the stream offered so far (Algorithm R)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seen = size, 0
        self.items: list[tuple[str, str, list[int]]] = []       # (domain, text, token ids)
        self.rng = random.Random(f"reservoir-{seed}")

    def offer(self, item) -> None:
        if len(self.items) < self.size:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.seen + 1)
            if j < self.size:
                self.items[j] = item
        self.seen += 1

    def domains(self) -> dict[str, int]:
        return dict(Counter(d for d, _, _ in self.items))


def mix(new: list, buffer: list, ratio: float, rng: random.Random) -> list:
    """`new` in its order with buffer items interleaved so that a fraction `ratio` of the result is replayed."""
    if not buffer or ratio <= 0:
        return list(new)
    out, credit, pool = [], 0.0, []
    per_new = ratio / (1.0 - ratio)
    for item in new:
        out.append(item)
        credit += per_new
        while credit >= 1.0 - 1e-9:
            if not pool:                        # draw without replacement, reshuffled when used up
                pool = list(range(len(buffer)))
                rng.shuffle(pool)
            out.append(buffer[pool.pop()])
            credit -= 1.0
    return out


class Replay(Baseline):
    name = "replay"

    def __init__(self, cl, seed, n_phases):
        super().__init__(cl, seed, n_phases)
        self.buffer = Reservoir(cl.replay_buffer, seed)
        self.replayed: list[int] = []          # replayed passages per phase

    def phase_examples(self, examples, cfg, seed):
        new = [examples[i] for i in epoch_order(len(examples), cfg.epochs, seed)]     # train_phase's own order
        mixed = mix(new, [ids for _, _, ids in self.buffer.items], self.cl.replay_ratio,
                    random.Random(f"replay-mix-{seed}"))
        self.replayed.append(len(mixed) - len(new))
        return mixed

    def update(self, live, dom, adapter, settings, last):
        texts = dom.train_texts
        for ex, record in zip(dom.train, dom.train_origin, strict=True):   # file order, as the run read them
            self.buffer.offer((dom.name, texts[record], ex))

    def storage(self):
        texts = [t for _, t, _ in self.buffer.items]
        return {**super().storage(), "buffer_size": self.cl.replay_buffer, "ratio": self.cl.replay_ratio,
                "passages_kept_as_text": len(texts), "text_bytes": sum(len(t.encode("utf-8")) for t in texts),
                "extra_bytes": sum(len(t.encode("utf-8")) for t in texts),
                "passages_per_domain": self.buffer.domains(), "passages_seen": self.buffer.seen,
                "replayed_per_phase": list(self.replayed)}
