"""Task scores in a continual run: an accuracy matrix beside the loss matrix, and an off-domain check.

A task set named after a run domain j is scored after every phase i (A[i][j]) for every domain seen so
far (j <= i, with its own adapter) and for the next one (j = i + 1, no adapter of its own yet: forward
transfer), on the latest backbone (task_matrix); unscored cells are None. In modular, the pinned matrix (how
the store serves) is derived exactly instead of scored again: P[i][j] = A[j][j] for j <= i (the same adapter
on the same backbone tensors, scored by the same deterministic code; `crma eval --tasks` measures it and a
test checks that it stays equal after later adds) and P[i][i+1] = A[i][i+1] (no adapter: the newest
backbone). Before any phase every set is scored on the untouched base model (task_base). A task set named
after no domain (e.g. general English) is an off-domain check: scored on the base model, and after the last
phase as the method serves it: routed traffic (the router picks per item, adapters pinned), or olora's every
adapter summed.

    ACC, BWT, FWT (crma.tasks.metrics) of A and task_base, in results.json when the run has finished.
"""
from __future__ import annotations

from contextlib import contextmanager

from ..baselines import Method
from ..config import TaskConfig
from ..tasks import average_accuracy, backward_transfer, forward_transfer
from .generate import AUTO
from .live import LiveModel
from .tasks import TaskSet, check_sharding, score_model, score_tasks


@contextmanager
def _model_in(live: LiveModel, context):
    """A serving context (method.serving, live.using, ...) that yields the live model."""
    with context:
        yield live.model


class RunTasks:
    """The task sets of one run and their scores so far."""

    def __init__(self, sources: dict[str, str], names: list[str], cfg: TaskConfig, progress: bool,
                 sharded: bool = False):
        self.sets = {name: TaskSet.load(name, src) for name, src in sources.items()}   # read before training
        if sharded:                                   # refused now, not after the first phase has trained
            for ts in self.sets.values():
                check_sharding(ts.items, True)
        self.names, self.cfg, self.progress = names, cfg, progress
        self.domain_sets = [n for n in names if n in self.sets]
        self.general = [n for n in self.sets if n not in names]
        self.base: dict[str, float] = {}
        self.matrix: list[list[float | None]] = []           # latest backbone
        self.routed: dict[str, list[dict]] = {n: [] for n in self.general}

    def _score(self, live: LiveModel, name: str, context) -> float:
        ts = self.sets[name]
        return score_model(live.model, live.tokenizer, ts.items, task=name, cfg=self.cfg, progress=self.progress,
                           serving=lambda: _model_in(live, context())).score

    def score_base(self, live: LiveModel) -> None:
        for name in self.sets:
            self.base[name] = self._score(live, name, live.untouched)

    def score_phase(self, live: LiveModel, phase: int, method: Method) -> None:
        """Row `phase` of the matrix (latest backbone)."""
        row: list[float | None] = []
        for j, name in enumerate(self.names):
            if name not in self.sets or j > phase + 1:
                row.append(None)
                continue
            if method.summed:                           # olora: every adapter trained so far, summed
                context = lambda: method.serving(live, None)               # noqa: E731
            else:
                context = lambda n=name, j=j: live.using(n if j <= phase else None, "latest")   # noqa: E731
            row.append(self._score(live, name, context))
        self.matrix.append(row)

    def pinned(self) -> list[list[float | None]]:
        A = self.matrix
        return [[A[j][j] if j <= i else A[i][j] for j in range(len(row))] for i, row in enumerate(A)]

    def score_routed(self, live: LiveModel, method: Method) -> None:
        """The off-domain sets as the method serves them: the router's pick per item (adapters pinned), or for
        olora (method.summed, no router) every adapter summed on every item."""
        for name in self.general:
            if method.summed:
                items = self.sets[name].items
                score = self._score(live, name, lambda: method.serving(live, None))
                self.routed[name].append({"score": score, "served": {"all adapters summed": len(items)}})
                continue
            got = score_tasks(live, self.sets[name].items, task=name, domain=AUTO, backbone="pinned", cfg=self.cfg,
                              progress=self.progress)
            self.routed[name].append({"score": got.score, "served": got.served})

    def results(self, finished: bool, modular: bool) -> dict:
        out = {"task_sets": {n: ts.record() for n, ts in self.sets.items()}, "task_base": self.base,
               "task_matrix": self.matrix}
        if modular:
            out["task_matrix_pinned"] = self.pinned()
        if self.general:
            out["task_general"] = {n: {"base": self.base[n], "routed": self.routed[n]} for n in self.general}
        if finished and self.domain_sets:
            base = [self.base.get(n) for n in self.names]
            for key in ("latest", "pinned") if modular else ("latest",):
                A = self.pinned() if key == "pinned" else self.matrix    # phases x domains, None: no set
                suffix = "_pinned" if key == "pinned" else ""
                out[f"task_acc{suffix}"] = average_accuracy(A)
                out[f"task_bwt{suffix}"] = backward_transfer(A)
                out[f"task_fwt{suffix}"] = forward_transfer(A, base)
        return out
