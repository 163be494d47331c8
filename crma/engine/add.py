"""Adding a domain to a store: train a fresh adapter (and, in modular, the backbone) on that domain's
data only, check it against the base model, and register the new versions.

    crma add --store DIR --domain NAME --data TRAIN[:HOLDOUT] [--condition modular|frozen] [--min-gain PCT]

`crma run` is a sequence of exactly these steps on one in-memory model (`add_domain`), so a run over
A, B, C and three `crma add` calls give the same numbers, to the last bit on CPU.
"""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from .. import runtime
from ..baselines import Method
from ..config import (
    SHARED_ADAPTER_CONDITIONS,
    ConfigError,
    CRMAConfig,
    DomainSpec,
    LoraSettings,
    TaskConfig,
    TrainConfig,
)
from ..data import DomainData, load_domain
from ..method.adapters import SHARED, add_adapter, save_adapter, set_trainable
from ..routing import RouterConfig, new_router, update_router
from ..store import Store, sha256_texts
from .live import LiveModel
from .loss import mean_loss, passage_losses
from .tasks import TaskSet, score_model
from .train import PhaseLog, train_phase


def data_record(dom: DomainData) -> dict:
    """What the store keeps about a domain's data: checksums, counts and what tokenising made of it; never text."""
    out = {}
    for part, records, examples in (("train", dom.train_records, dom.train), ("holdout", dom.holdout_records,
                                                                               dom.holdout)):
        stats = dom.stats.get(part)
        out[part] = {"sha256": sha256_texts([r.canonical() for r in records]), "passages": len(records),
                     "tokens": sum(map(len, examples)), **({"stats": asdict(stats)} if stats else {})}
    out["holdout"]["duplicates_removed"] = list(dom.duplicates)    # record keys (hashes), never text
    return out


def load_spec(spec: DomainSpec, tokenizer, cfg: TrainConfig) -> DomainData:
    """Read and tokenise one domain (crma.data.load_domain) from its command-line spec."""
    return load_domain(spec.name, spec.train, spec.holdout, tokenizer, cfg, spec.route_examples)


@dataclass
class AddSettings:
    """Everything that defines how one domain is trained onto a store."""

    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    crma: CRMAConfig = field(default_factory=CRMAConfig)
    min_gain: float | None = 0.0        # percent over the base model's holdout loss; None: no gate (runs)
    tasks: TaskSet | None = None        # scored for the new adapter and the base model, recorded
    task: TaskConfig = field(default_factory=TaskConfig)
    min_task_score: float | str | None = None   # the task gate: a score in [0, 1], "base" or None (no gate)


@dataclass
class AddResult:
    domain: str
    adapter: str
    registered: bool
    reason: str
    base_loss: float
    loss: float                         # holdout loss with the new adapter (on the backbone it trained with)
    gain_pct: float
    log: PhaseLog
    base_passages: list                 # per-passage (loss sum, tokens), for the run's probes
    version: int | None = None
    backbone_version: int | None = None
    router_version: int | None = None
    tasks: dict | None = None           # meta["tasks"]: the task set, the new adapter's and the base's scores


def score_add_tasks(live: LiveModel, adapter: str, settings: AddSettings, method: Method, progress: bool) -> dict:
    """The task set scored with the new adapter (as it will be served) and on the untouched base model."""
    ts, cfg = settings.tasks, settings.task
    base = score_model(live.model, live.tokenizer, ts.items, task=ts.name, label="base", cfg=cfg,
                       progress=progress, serving=live.untouched)
    with method.serving(live, adapter):
        new = score_model(live.model, live.tokenizer, ts.items, task=ts.name, label=adapter, cfg=cfg,
                          progress=progress)
    return {**ts.record(), "score": new.score, "base_score": base.score, "metrics": new.metrics,
            "base_metrics": base.metrics, "min_task_score": settings.min_task_score}


def task_gate(tasks: dict, threshold: float | str | None) -> str | None:
    """Why the task gate refuses (None: it passes)."""
    if threshold is None:
        return None
    floor, what = (tasks["base_score"], "the base model's") if threshold == "base" else (threshold, "--min-task-score")
    if tasks["score"] < floor:
        return (f"not registered: task score {tasks['score']:.4f} on {tasks['name']} ({tasks['items']} items) is "
                f"below {what} {floor:.4f}; the store is unchanged")
    return None


def evaluate(live: LiveModel, dom: DomainData, settings: AddSettings, progress: bool = False) -> list:
    """Per-passage (loss sum, tokens) of `dom`'s holdout with whatever `live` currently has active."""
    return passage_losses(live.model, dom.holdout, settings.train.eval_batch_size, live.tokenizer.pad_token_id,
                          desc=f"eval {dom.name}", progress=progress)


def train_domain(live: LiveModel, dom: DomainData, phase: int, settings: AddSettings,
                 accelerator: Accelerator, method: Method) -> tuple[str, PhaseLog]:
    """Train `dom`'s adapter in place on `live`: a fresh LoRA adapter named after the domain (naive:
    the shared one, continued), plus the backbone in modular. Returns (adapter name, log).
    `method` (crma.baselines.make_method) holds what a baseline condition keeps across phases."""
    naive = live.condition in SHARED_ADAPTER_CONDITIONS
    adapter = SHARED if naive else dom.name
    if live.condition == "modular" and live.backbone is None:
        live.create_backbone(settings.crma, seed=settings.seed)
    if not (naive and SHARED in live.adapters):
        live.drop_adapter(adapter)                          # a re-added domain starts a fresh adapter
        torch.manual_seed(settings.seed * 1000 + phase)     # the same LoRA init in every condition
        live.model = add_adapter(live.model, adapter, settings.lora)
    backbone = live.backbone if live.condition == "modular" else None
    with method.training(live, adapter):
        live.set_backbone(live.store.backbone_version(None) if live.store else None)
        lora_params = set_trainable(live.model, adapter, backbone=backbone is not None)
        method.begin_phase(live, adapter, lora_params)
        log = train_phase(live.model, dom.train, settings.train, seed=settings.seed * 1000 + phase,
                          domain=dom.name, adapter=adapter, lora_params=lora_params, backbone=backbone,
                          accelerator=accelerator, pad_id=live.tokenizer.pad_token_id, method=method)
        method.after_phase(live, dom, adapter, settings)      # Fisher, reservoir, frozen A (timed apart)
    set_trainable(live.model, None, backbone=False)
    live.adapters[adapter] = -1                            # trained in memory, not registered yet
    return adapter, log


REGISTER_WAIT = 600.0      # seconds a trained add waits for another writer's lock before giving up


def waiting(holder: str) -> None:
    print(f"crma add: waiting for the store's writer lock ({holder})", file=sys.stderr, flush=True)


def add_domain(live: LiveModel, root: Path, dom: DomainData, settings: AddSettings, method: Method, *,
               command: str = "", router_cfg: RouterConfig | None = None, accelerator: Accelerator | None = None,
               progress: bool = True, create: dict | None = None, base: list | None = None) -> AddResult:
    """Train `dom` onto `live` and register it in the store at `root` (created from `create` when new).

    Nothing is written unless the new adapter's holdout loss beats the base model's by at least
    settings.min_gain percent. The store's writer lock is held only while writing (a concurrent writer's lock
    is waited for, up to REGISTER_WAIT seconds); registration is refused, and nothing written, when another
    writer changed the store in a way that matters since `live.store` was read (Writer.check_unchanged)."""
    accelerator = accelerator or runtime.accelerator()
    if runtime.base_sharded() and (router_cfg or RouterConfig()).encoder == "base":
        raise ConfigError("router encoder 'base' reads the base model on the main process alone, which a "
                          "sharded base (--fsdp) cannot do; use the default encoder (minilm)")
    store = live.store
    since = copy.deepcopy(store.manifest) if store else None      # what this add trains from: checked at the end
    phase = sum(1 for e in store.manifest["log"] if e["op"] == "add") if store else 0
    if base is None:                       # a run has measured it already (the base row of its matrix)
        with live.untouched():
            base = evaluate(live, dom, settings, progress)
    adapter, log = train_domain(live, dom, phase, settings, accelerator, method)
    with method.serving(live, adapter):                       # olora: every adapter summed
        after = evaluate(live, dom, settings, progress)
    base_loss, loss = mean_loss(base), mean_loss(after)
    gain = 100.0 * (base_loss - loss) / base_loss
    result = AddResult(dom.name, adapter, False, "", base_loss, loss, gain, log, base)
    if settings.min_gain is not None and gain < settings.min_gain:
        result.reason = (f"not registered: holdout loss {loss:.4f} vs base model {base_loss:.4f} is a gain of "
                         f"{gain:+.2f}%, below --min-gain {settings.min_gain:g}%; the store is unchanged")
        return result
    if settings.tasks is not None:
        result.tasks = score_add_tasks(live, adapter, settings, method, progress)
        if refused := task_gate(result.tasks, settings.min_task_score):
            result.reason = refused
            return result

    def register() -> tuple[int, int | None, int, dict]:     # the main process writes; the others wait
        backbone_version = None
        with Store.writer(root, command, create=create, wait=REGISTER_WAIT, on_wait=waiting) as w:
            w.check_unchanged(since, dom.name, adapter)
            if live.backbone is not None and live.condition == "modular":
                backbone_version = w.add_backbone_version(
                    lambda folder: live.backbone.save(folder), {"trained_on": dom.name, "phase": phase,
                                                                "crma": asdict(live.backbone.cfg)})
            router = w.store.router() or new_router(live.model, router_cfg or RouterConfig(),
                                                        meta={"model": live.spec, "condition": live.condition},
                                                        tokenizer=live.tokenizer)
            update_router(router, live.model, live.tokenizer, dom.name, adapter, dom.route_texts, dom.holdout_texts)
            router_version = w.add_router_version(router, f"add {dom.name}")
            meta = {"adapter": adapter, "backbone_version": backbone_version, "router_version": router_version,
                    "phase": phase, "data": data_record(dom), "base_loss": base_loss, "holdout_loss": loss,
                    "gain_pct": gain, **({"tasks": result.tasks} if result.tasks else {}),
                    "train": {**asdict(settings.train), "seed": settings.seed},
                    "lora": asdict(settings.lora), "steps": len(log.losses), "train_tokens": log.tokens,
                    "train_seconds": round(log.seconds, 3)}

            def save(folder: Path) -> None:
                save_adapter(live.model, adapter, folder)
                (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

            version = w.add_adapter_version(dom.name, adapter, save, meta)
            if adapter == SHARED:                         # every domain is served by the newest shared adapter
                for d in w.store.domains():
                    w.set_domain_version(d, adapter, version)
            w.log("add", domain=dom.name, version=version, backbone_version=backbone_version,
                  router_version=router_version)
            w.commit()
        return version, backbone_version, router_version, Store(root).manifest

    # every process gets the new manifest from the main one: no other process needs to read the folder
    result.version, result.backbone_version, result.router_version, manifest = runtime.on_main(register)
    runtime.reshard(live.model)              # the main process saved (state_dict): same FSDP state everywhere
    live.store = Store.view(root, manifest)
    live.adapters[adapter] = result.version
    if result.backbone_version is not None:
        live.remember_backbone(result.backbone_version)
    result.registered = True
    result.reason = (f"registered {dom.name} v{result.version}: holdout loss {loss:.4f} "
                     f"(base model {base_loss:.4f}, gain {gain:+.2f}%)")
    if result.tasks:
        result.reason += (f"; task score {result.tasks['score']:.4f} on {result.tasks['name']} "
                          f"(base model {result.tasks['base_score']:.4f})")
    return result
