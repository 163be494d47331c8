"""`crma run`, `crma add` and `crma demo`: the commands that train.

    crma run  --domains NAME=TRAIN[:HOLDOUT] ... --out DIR [--condition C]    a continual run (a store + results)
    crma add  --store DIR --domain NAME --data TRAIN[:HOLDOUT]                 add one domain to a model store
    crma demo [--out DIR] [--model M]                                         the bundled demo, end to end
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from .. import runtime
from ..baselines import make_method
from ..config import ALL_CONDITIONS, CONDITIONS, ConfigError, CRMAConfig, DomainSpec, RunConfig
from ..demo import DEMO_DEFAULTS, run_demo
from ..engine.add import AddSettings, add_domain, load_spec
from ..engine.live import LiveModel
from ..engine.run import continual_run
from ..engine.tasks import TaskSet, check_sharding, parse_min_score
from ..method.models import DEFAULT_MODEL
from ..routing import RouterConfig
from ..store import MANIFEST, Store, StoreError, creation_blockers, creation_settings
from .options import add_options, build, named, opt
from .settings import add_sections, sections

RUN_SECTIONS = ("train", "lora", "crma", "cl", "device", "task")   # crma run: every section (cl: the baselines)
ADD_SECTIONS = ("train", "lora", "crma", "device", "task")


@dataclass
class RunArgs:
    domains: list[str] = opt(help="the domains in order, each NAME=TRAIN[:HOLDOUT]", metavar="NAME=TRAIN[:HOLDOUT]")
    out: Path = opt(help="the run's folder: a model store plus results.json")
    model: str = opt(DEFAULT_MODEL, help="hub id, local dir, smollm2-135m or tiny:<family>")
    condition: str = opt("modular", choices=ALL_CONDITIONS,
                         help="naive, frozen, modular; or a continual-learning baseline: ewc, replay, olora (--cl-*)")
    seed: int = opt(0)
    tasks: list[str] = opt([], metavar="NAME=FILE",
                           help="task items scored after every phase (docs/tasks.md): NAME a domain of the run (an "
                                "accuracy matrix), or any other name (an off-domain set, scored as routed traffic)")
    overwrite: bool = opt(False, help="replace whatever --out holds")


@dataclass
class AddArgs:
    store: Path = opt(help="store folder (created by the first add)")
    domain: str = opt(help="domain name: [a-z0-9][a-z0-9_-]{0,63}")
    data: str = opt(metavar="TRAIN[:HOLDOUT]",
                    help=".jsonl/.json/.csv/.parquet/.txt, a folder, a save_to_disk dataset or hf://NAME?split=S "
                         "(docs/data.md); without HOLDOUT 10%% is held out")
    route_examples: str | None = opt(None, metavar="FILE",
                                     help="example queries for this domain (any data format); the router keeps "
                                          "only their statistics")
    model: str | None = opt(None, help=f"base model of a new store (default {DEFAULT_MODEL})")
    condition: str | None = opt(None, choices=("modular", "frozen"), help="of a new store (default modular)")
    min_gain: float = opt(0.0, help="register only if the holdout loss beats the base model's by this many "
                                    "percent (default 0)")
    tasks: str | None = opt(None, metavar="FILE", help="task items (docs/tasks.md) scored for the new adapter and "
                                                       "the base model, recorded in the store")
    min_task_score: str | None = opt(None, metavar="X|base",
                                     help="with --tasks: register only if the task score is at least X (0 to 1), "
                                          "or at least the base model's (base)")
    seed: int = opt(0)


@dataclass
class DemoArgs:
    model: str = opt(DEFAULT_MODEL)
    out: Path = opt(Path("runs/demo"))
    conditions: str = opt("naive,modular", help="comma list of conditions")
    seed: int = opt(0)


def cmd_run(args: argparse.Namespace) -> int:
    a = build(args, RunArgs)
    cfg = RunConfig(domains=[DomainSpec.parse(d) for d in a.domains], out=a.out, model=a.model,
                    condition=a.condition, seed=a.seed, tasks=named(a.tasks, "--tasks"),
                    **sections(args, RUN_SECTIONS))
    continual_run(cfg, command=args.command_line, router_cfg=sections(args, ("router",))["router"],
                  overwrite=a.overwrite)
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    a, configs = build(args, AddArgs), sections(args, ADD_SECTIONS)
    device = configs["device"]
    runtime.accelerator(device)                  # first: under a launcher, join the process group
    say = print if runtime.is_main() else (lambda *a, **k: None)
    root = Path(a.store)
    spec = dataclasses.replace(DomainSpec.parse(f"{a.domain}={a.data}"), route_examples=a.route_examples)
    if a.min_task_score is not None and a.tasks is None:
        raise ConfigError("--min-task-score gates on a task score: give the task items with --tasks FILE")
    gate = parse_min_score(a.min_task_score)
    tasks = TaskSet.load(spec.name, a.tasks) if a.tasks else None      # read before the model loads
    if tasks is not None:
        check_sharding(tasks.items, device.fsdp)
    store = Store(root) if os.path.lexists(root / MANIFEST) else None
    if store is not None:
        for name, given, have in (("--model", a.model, store.model_spec),
                                  ("--condition", a.condition, store.condition)):
            if given is not None and given != have:
                raise ConfigError(f"{name} {given}: the store at {root} was created with {have}; "
                                  "a store keeps one base model and condition")
        if store.condition not in CONDITIONS:
            raise ConfigError(f"condition {store.condition}: a continual-learning baseline exists for `crma run` and "
                              "`crma bench` only (its state lives in the run); "
                              "`crma add` builds modular or frozen stores")
    elif os.path.lexists(root) and not root.is_dir():
        raise StoreError(f"{root}: is a file, not a store folder")
    elif blockers := creation_blockers(root):       # a killed first add's leftovers do not count: swept later
        raise StoreError(f"{root}: not a crma store (no {MANIFEST}) and not empty ({', '.join(blockers[:5])}"
                         f"{', ...' if len(blockers) > 5 else ''}); choose an empty folder")
    try:                                         # before the model loads and trains: fail now, not after
        runtime.on_main(Store.check_writable, root, spec.name, store.manifest if store else None)
    except StoreError as err:
        raise type(err)(f"{err} (checked before training: nothing was trained or written)") from None
    exists = store is not None
    if exists:
        crma = CRMAConfig(**store.manifest["settings"].get("crma", {}))
        router_cfg = RouterConfig.from_dict(store.manifest["settings"].get("router", {}))
        live = LiveModel.open(store, device=device)   # the base model as the store was built (tiny models: its seed)
    else:
        crma, router_cfg = configs["crma"], RouterConfig()
        live = LiveModel.fresh(a.model or DEFAULT_MODEL, a.condition or "modular", seed=a.seed, device=device)
    settings = AddSettings(seed=a.seed, train=configs["train"], lora=configs["lora"], crma=crma, min_gain=a.min_gain,
                           tasks=tasks, task=configs["task"], min_task_score=gate)
    dom = load_spec(spec, live.tokenizer, settings.train)
    say(f"crma add: {dom.name} -> {root} [{live.condition}, {live.spec}{', new store' if not exists else ''}]\n"
        f"  train: {dom.stats['train'].line()}\n  holdout: {dom.stats['holdout'].line()}"
        + (f" ({dom.stats['holdout'].duplicates_removed} duplicates of train records removed)"
           if dom.stats['holdout'].duplicates_removed else ""), flush=True)
    create = None if exists else creation_settings(live.condition, live.spec, live.base_fingerprint, seed=a.seed,
                                                   crma=crma, lora=settings.lora, router=router_cfg)
    result = add_domain(live, root, dom, settings, make_method(live.condition, seed=a.seed),
                        command=args.command_line, router_cfg=router_cfg, create=create)
    say(result.reason)
    if result.registered and result.backbone_version is not None:
        say(f"backbone v{result.backbone_version} (the version {dom.name} is pinned to); "
            f"router v{result.router_version}")
    return 0 if result.registered else 1


def cmd_demo(args: argparse.Namespace) -> int:
    a = build(args, DemoArgs)
    run_demo(out=a.out, model=a.model, conditions=a.conditions.split(","), seed=a.seed,
             command=args.command_line, **sections(args, ("train", "lora", "crma")))
    return 0


def register(sub) -> None:
    run = sub.add_parser("run", help="continual run over domains in order, with forgetting metrics")
    add_options(run, RunArgs)
    add_sections(run, RUN_SECTIONS + ("router",))
    run.set_defaults(func=cmd_run)

    add = sub.add_parser("add", help="train a domain's adapter onto a model store and register it",
                         description="Train a fresh adapter for one domain (modular: the backbone trains too and "
                                     "becomes a new version), check it against the base model, register it.")
    add_options(add, AddArgs)
    add_sections(add, ADD_SECTIONS)
    add.set_defaults(func=cmd_add)

    demo = sub.add_parser("demo", help="short naive vs modular run on the bundled demo data")
    add_options(demo, DemoArgs)
    add_sections(demo, ("train", "lora", "crma"), DEMO_DEFAULTS)
    demo.set_defaults(func=cmd_demo)
