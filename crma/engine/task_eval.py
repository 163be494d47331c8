"""`crma eval --tasks`: each task set's score now, beside the score recorded when its domain was registered.

    crma eval --store DIR --tasks medical=medical_qa.jsonl legal=... [--domain own|auto|base|NAME]
              [--backbone pinned|latest|both] [--json]

A task set NAME is served by the domain NAME (`own`, the default), by the router's pick per item (`auto`:
what a user of `model="auto"` gets), by no adapter (`base`: what `model="base"` gets) or by one named domain.
Beside it: the untouched base model's score (no adapter, no CRMA), the reference `crma add --tasks`
recorded. On a pinned store an earlier domain's own score stays exactly what was recorded.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..config import ConfigError, TaskConfig
from ..store import Store, StoreError
from .generate import AUTO
from .live import LiveModel
from .tasks import TaskSet, score_model, score_tasks

OWN = "own"


@dataclass
class TaskEval:
    task: str
    items: int
    served_by: str                        # a domain, auto or base
    recorded: float | None                # the score `crma add --tasks` recorded for this task set (same items)
    recorded_base: float | None           # the base model's score recorded then
    score: dict[str, float | None]        # backbone mode -> score now (None: a file it needs is damaged)
    base: float                           # the untouched base model's score now
    metrics: dict[str, dict] = field(default_factory=dict)   # backbone mode -> every metric
    served: dict[str, dict] = field(default_factory=dict)    # backbone mode -> domain -> items it served
    damaged: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict:
        return asdict(self)


def _served_by(store: Store, task: str, domain: str) -> str:
    if domain == OWN:
        if task not in store.domains():
            raise ConfigError(f"--tasks {task}=...: {task!r} is not a domain of {store.root} "
                              f"({', '.join(store.domains()) or 'none'}); name the task set after its domain or "
                              f"choose --domain auto, base or a domain")
        return task
    if domain not in (AUTO, "base"):
        store.adapter_name(domain)                          # StoreError naming the store's domains
    return domain


def _recorded(store: Store, task: str, ts: TaskSet) -> tuple[float | None, float | None]:
    """The scores recorded for these items when `task` was registered (None when not recorded or other items)."""
    if task not in store.domains():
        return None, None
    rec = store.adapter_meta(task).get("tasks")
    if not rec or rec.get("sha256") != ts.sha256():
        return None, None
    return rec["score"], rec["base_score"]


def evaluate_store_tasks(live: LiveModel, tasks: dict[str, str], modes: tuple[str, ...] = ("pinned",),
                         domain: str = OWN, cfg: TaskConfig | None = None, progress: bool = True) -> list[TaskEval]:
    """Every task set scored as `domain` serves it under each backbone mode, and on the untouched base model."""
    store = live.store
    sets = {name: TaskSet.load(name, source) for name, source in tasks.items()}    # every file read first
    served_by = {name: _served_by(store, name, domain) for name in sets}
    out = []
    for name, ts in sets.items():
        recorded, recorded_base = _recorded(store, name, ts) if served_by[name] == name else (None, None)
        base = score_model(live.model, live.tokenizer, ts.items, task=name, label="base", cfg=cfg,
                           progress=progress, serving=live.untouched)
        row = TaskEval(name, len(ts.items), served_by[name], recorded, recorded_base, {}, base.score)
        for mode in modes:
            try:
                got = score_tasks(live, ts.items, task=name, domain=served_by[name], backbone=mode, cfg=cfg,
                                  progress=progress)
            except StoreError as err:                # a damaged or missing file: this cell only
                row.score[mode], row.damaged[mode] = None, str(err).replace(f"{store.root}/", "")
                continue
            row.score[mode], row.metrics[mode], row.served[mode] = got.score, got.metrics, got.served
        out.append(row)
    return out


def format_task_eval(rows: list[TaskEval], store: Store) -> str:
    modes = list(rows[0].score) if rows else []
    head = (f"{'task':<14}{'items':>6}  {'served by':<12}{'recorded':>9}"
            + "".join(f"{m:>9}{'change':>8}" for m in modes) + f"{'base now':>10}{'recorded':>9}")
    lines = [f"crma eval --tasks: {store.root} ({store.condition}, {store.model_spec})", head]

    def num(x: float | None) -> str:
        return f"{x:>9.4f}" if x is not None else f"{'-':>9}"

    for r in rows:
        cells = ""
        for m in modes:
            now = r.score[m]
            change = f"{now - r.recorded:>+8.4f}" if now is not None and r.recorded is not None else f"{'-':>8}"
            cells += (num(now) if now is not None else f"{'damaged':>9}") + change
        lines.append(f"{r.task:<14}{r.items:>6}  {r.served_by:<12}{num(r.recorded)}{cells}{r.base:>10.4f}"
                     f"{num(r.recorded_base)}")
        for m in modes:
            if r.served_by == AUTO and r.served.get(m):
                lines.append(f"  {r.task} ({m}): the router served " + ", ".join(
                    f"{d} {n}" for d, n in sorted(r.served[m].items(), key=lambda kv: -kv[1])))
        lines += [f"  {r.task} ({m}) could not be scored: {why}" for m, why in r.damaged.items()]
    lines.append("score: per item, a multiple-choice pick (length-normalised) right or not, a free-form answer's "
                 "token F1; recorded = at registration (crma add --tasks), same items; base = no adapter, no CRMA")
    return "\n".join(lines)
