"""`crma store list|show|rollback|remove`, `crma eval` and `crma generate`: looking at a store and using it.

    crma store show DIR [NAME]                     domains, versions, pinned backbones, the history
    crma eval --store DIR --data NAME=HOLDOUT ...  losses now vs at registration, pinned and latest backbone
    crma generate --store DIR [--domain NAME|auto|base] "prompt"    routed, streamed generation
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import runtime
from ..config import ConfigError
from ..engine.evaluation import evaluate_store, format_eval
from ..engine.generate import AUTO, choose_domain, generate
from ..engine.live import LiveModel
from ..engine.task_eval import OWN, evaluate_store_tasks, format_task_eval
from ..store import Store, StoreError
from ..store.repair import repair
from ..store.summary import describe
from ..store.verify import damaged_parts
from .options import add_options, build, named, opt
from .settings import add_sections, sections


@dataclass
class StoreArgs:
    dir: Path = opt(positional=True, help="the model store folder")


@dataclass
class ShowArgs(StoreArgs):
    name: str | None = opt(None, positional=True, help="a domain (default: the whole store)")
    json: bool = opt(False, help="the whole store as JSON (what the web console shows)")


@dataclass
class RemoveArgs(StoreArgs):
    name: str = opt(positional=True, help="the domain")


@dataclass
class RollbackArgs(RemoveArgs):
    to: str | None = opt(None, help="version (default: the one before the current)")


@dataclass
class VerifyArgs(StoreArgs):
    repair: bool = opt(False, help="serve again what can be: rebuild a damaged router from the registered "
                                   "statistics, roll a damaged domain back to its newest whole version")


@dataclass
class EvalArgs:
    store: Path = opt(help="the model store folder")
    data: list[str] = opt([], metavar="NAME=HOLDOUT", help="each domain's holdout data: its loss now")
    tasks: list[str] = opt([], metavar="NAME=FILE", help="task items per domain (docs/tasks.md): their score now")
    backbone: str = opt("both", choices=("pinned", "latest", "both"),
                        help="backbone version: the adapter's own (pinned), the newest (latest), or both")
    domain: str = opt(OWN, help="what serves each task set: own (the domain it is named after), auto (the router "
                                "picks per item), base (no adapter) or a domain")
    json: bool = opt(False, help="print the results as JSON")


@dataclass(kw_only=True)
class GenerateArgs:
    store: Path = opt(help="the model store folder")
    domain: str = opt(AUTO, help="a domain, auto (the router picks) or base (no adapter)")
    backbone: str = opt("pinned", choices=("pinned", "latest"))
    max_new_tokens: int = opt(128)
    temperature: float = opt(0.7, help="0 = greedy (deterministic)")
    top_p: float = opt(0.9)
    seed: int = opt(0)
    raw: bool = opt(False, help="no chat template")
    prompt: str = opt(positional=True)


def _versions_line(store: Store, domain: str) -> str:
    current = store.manifest["domains"][domain]["current"]
    return ", ".join(("*" if v == current else "") + f"v{v}" for v in store.versions(domain))


def cmd_store(args: argparse.Namespace) -> int:
    if args.action == "verify":
        return _verify(args)
    if args.action in ("rollback", "remove"):
        with Store.writer(args.dir, args.command_line) as w:
            if args.action == "rollback":
                v = w.rollback(args.name, args.to)
                msg = f"{args.name}: now serving v{v}"
            else:
                w.remove(args.name)
                msg = f"{args.name}: removed (its versions stay on disk; `crma add` starts a new version)"
            w.commit()
        print(msg)
        return 0
    store = Store(args.dir)
    if args.action == "show" and args.json:
        print(json.dumps(describe(store), indent=2))
        return 0
    if args.action == "list" or (args.action == "show" and not args.name):
        m = store.manifest
        bb = m["backbone"]
        print(f"store {store.root}: {m['condition']} on {m['model']['spec']} "
              f"({m['model']['fingerprint']['architecture']}, "
              f"fingerprint {m['model']['fingerprint'].get('weights_bf16_sha256', '?')})")
        print(f"backbone: {'v' + str(bb['current']) if bb['current'] else 'none'} current, "
              f"{len(bb['versions'])} versions; "
              f"router: v{m['router']['current']}; created {m['created']}, updated {m['updated']}")
        print(f"{'domain':<16}{'serving':>8}{'backbone':>10}{'holdout':>9}{'gain':>9}  versions (* = current)")
        for d in store.domains():
            meta = store.adapter_meta(d)
            bbv = meta.get("backbone_version")
            print(f"{d:<16}{'v' + str(meta['version']):>8}{('v' + str(bbv)) if bbv else '-':>10}"
                  f"{meta['holdout_loss']:>9.4f}{meta['gain_pct']:>+8.2f}%  {_versions_line(store, d)}")
        removed = [d for d, e in m["domains"].items() if e["status"] == "removed"]
        if removed:
            print(f"removed: {', '.join(removed)}")
        for part, why in _damage_lines(damaged_parts(store)):
            print(f"UNAVAILABLE {part}: {why}")
        if args.action == "show":
            print("history:")
            for e in m["log"][-20:]:
                print(f"  {e['time']}  {e['op']:<8} {e.get('domain', e.get('part', ''))} "
                      + (f"v{e['version']}" if e.get("version") else ""))
        return 0
    entry = store.manifest["domains"].get(args.name)
    if entry is None:
        raise StoreError(f"{store.root}: no domain {args.name!r} (domains: {', '.join(store.domains()) or 'none'})")
    print(json.dumps({"domain": args.name, **entry, "versions": {
        v: meta for v, meta in store.manifest["adapters"][entry["adapter"]].items() if meta["domain"] == args.name}},
        indent=2))
    return 0


def _damage_lines(damage) -> list[tuple[str, str]]:
    lines = [(d, why) for d, why in damage.domains.items()]
    if damage.router:
        lines.append(("router (auto)", damage.router))
    if damage.backbone:
        lines.append(("newest backbone (base)", damage.backbone))
    return lines


def _verify(args: argparse.Namespace) -> int:
    """Every file the store serves against its checksum; exit 1 when something is damaged (after --repair:
    when something could not be repaired)."""
    store = Store(args.dir)
    found = _damage_lines(damaged_parts(store))
    for part, why in found:
        print(f"damaged: {part}: {why}")
    if found and args.repair:
        for line in repair(args.dir, args.command_line):
            print(f"repair: {line}")
        found = _damage_lines(damaged_parts(Store(args.dir)))
    print(f"{store.root}: " + ("every file the store serves is whole" if not found else
                               f"{len(found)} part(s) unavailable" + ("" if args.repair else
                                                                      "; `--repair` serves what it can again")))
    return 1 if found else 0


def cmd_eval(args: argparse.Namespace) -> int:
    a, configs = build(args, EvalArgs), sections(args, ("device", "task"))
    device = configs["device"]
    runtime.accelerator(device)
    store = Store(a.store)
    data, tasks = named(a.data, "--data", "HOLDOUT"), named(a.tasks, "--tasks")
    if not data and not tasks:
        raise ConfigError("crma eval: give --data NAME=HOLDOUT (holdout loss) and/or --tasks NAME=FILE (task scores)")
    if a.backbone == "both":
        modes = ("pinned", "latest") if store.manifest["backbone"]["current"] else ("pinned",)
    else:
        modes = (a.backbone,)
    live = LiveModel.open(store, device=device, damaged_ok=True)
    rows = evaluate_store(live, data, modes) if data else []
    task_rows = evaluate_store_tasks(live, tasks, modes, a.domain, configs["task"]) if tasks else []
    if runtime.is_main():
        if a.json:
            print(json.dumps({"store": str(store.root), "loss": [asdict(r) for r in rows],
                              "tasks": [r.record() for r in task_rows]}, indent=2))
        else:
            print("\n\n".join(([format_eval(rows, store)] if rows else [])
                              + ([format_task_eval(task_rows, store)] if task_rows else [])))
    return 1 if any(r.damaged for r in rows) or any(r.damaged for r in task_rows) else 0


def cmd_generate(args: argparse.Namespace) -> int:
    a, device = build(args, GenerateArgs), sections(args, ("device",))["device"]
    live = LiveModel.open(Store(a.store), device=device)
    domain, confidence, runner_up = choose_domain(live, a.prompt, a.domain)
    if a.domain == AUTO:
        extra = f", runner-up {runner_up}" if runner_up else ""
        conf = f" (confidence {confidence:.3f}{extra})" if confidence is not None else ""
        print(f"[router: {domain}{conf}]", file=sys.stderr, flush=True)
    gen = generate(live, a.prompt, domain=domain, backbone=a.backbone, max_new_tokens=a.max_new_tokens,
                   temperature=a.temperature, top_p=a.top_p, seed=a.seed, raw=a.raw,
                   on_text=lambda piece: print(piece, end="", flush=True))
    print()
    print(f"[{gen.new_tokens} tokens in {gen.seconds:.1f}s, {gen.domain}"
          + (f" adapter v{gen.adapter_version}" if gen.adapter_version else "")
          + (f", backbone v{gen.backbone_version} ({a.backbone})" if gen.backbone_version else "") + "]",
          file=sys.stderr)
    return 0


def register(sub) -> None:
    store = sub.add_parser("store", help="list, show, roll back or remove a store's domains")
    actions = store.add_subparsers(dest="action", required=True)
    for name, cls, help_ in (("list", StoreArgs, "domains and their current versions"),
                             ("show", ShowArgs, "the store, or one domain's versions"),
                             ("rollback", RollbackArgs, "serve a domain's earlier version"),
                             ("remove", RemoveArgs, "stop serving a domain"),
                             ("verify", VerifyArgs, "check every file the store serves; --repair what can be")):
        p = actions.add_parser(name, help=help_)
        add_options(p, cls)
        p.set_defaults(func=cmd_store)

    ev = sub.add_parser("eval", help="per-domain holdout loss and task scores now, beside those recorded at "
                                     "registration")
    add_options(ev, EvalArgs)
    add_sections(ev, ("device", "task"), hidden=("gradient_checkpointing",))   # --fsdp: a launched eval
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="generate text from a store, routed to a domain adapter")
    add_options(gen, GenerateArgs)
    add_sections(gen, ("device",), hidden=("gradient_checkpointing", "fsdp"))
    gen.set_defaults(func=cmd_generate)
