"""The store's commands: `crma add`, `crma store list|show|rollback|remove`, `crma eval`, `crma generate`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import ConfigError, CRMAConfig, DomainSpec
from .manifest import MANIFEST, StoreError
from .store import Store


def cmd_add(args: argparse.Namespace, configs: dict) -> int:
    from .. import runtime
    from ..routing import RouterConfig
    from .add import AddSettings, add_domain, load_domain, store_settings
    from .live import LiveModel

    device = configs["device"]
    runtime.accelerator(device)                  # first: under a launcher, join the process group
    say = print if runtime.is_main() else (lambda *a, **k: None)
    root = Path(args.store)
    spec = DomainSpec.parse(f"{args.domain}={args.data}")
    exists = (root / MANIFEST).exists()
    if exists:
        store = Store(root)
        for opt, given, have in (("--model", args.model, store.model_spec), ("--condition", args.condition, store.condition)):
            if given is not None and given != have:
                raise ConfigError(f"{opt} {given}: the store at {root} was created with {have}; "
                                  "a store keeps one base model and condition")
        crma = CRMAConfig(**store.manifest["settings"]["crma"])
        router_cfg = RouterConfig.from_dict(store.manifest["settings"]["router"])
        live = LiveModel.open(store, device=device)   # the base model as the store was built (tiny models: its seed)
    else:
        if root.exists() and any(p.name != ".lock" for p in root.iterdir()):
            raise StoreError(f"{root}: not a crma store (no {MANIFEST}) and not empty; choose an empty folder")
        condition = args.condition or "modular"
        if condition not in ("modular", "frozen"):
            raise ConfigError(f"--condition {condition}: `crma add` builds modular or frozen stores "
                              "(naive, one shared adapter, forgets by design: use `crma run` to measure it)")
        crma, router_cfg = configs["crma"], RouterConfig()
        live = LiveModel.fresh(args.model or "smollm2-135m", condition, seed=args.seed, device=device)
    settings = AddSettings(seed=args.seed, train=configs["train"], lora=configs["lora"], crma=crma,
                           min_gain=args.min_gain)
    dom = load_domain(spec, live.tokenizer, settings.train)
    say(f"crma add: {dom.name} ({len(dom.train)} train / {len(dom.holdout)} holdout passages) -> {root} "
          f"[{live.condition}, {live.spec}{', new store' if not exists else ''}]", flush=True)
    create = None if exists else store_settings(live.condition, live.spec, live.base_fingerprint, settings, router_cfg)
    result = add_domain(live, root, dom, settings, command=args.command_line, router_cfg=router_cfg, create=create)
    say(result.reason)
    if result.registered and result.backbone_version is not None:
        say(f"backbone v{result.backbone_version} (the version {dom.name} is pinned to); router v{result.router_version}")
    return 0 if result.registered else 1


def _versions_line(store: Store, domain: str) -> str:
    entry = store.manifest["domains"][domain]
    versions = store.manifest["adapters"][entry["adapter"]]
    return ", ".join(("*" if int(v) == entry["current"] else "") + f"v{v}" for v in versions
                     if versions[v]["domain"] == domain or entry["adapter"] != domain)


def cmd_store(args: argparse.Namespace) -> int:
    from .add import load_router

    if args.action in ("rollback", "remove"):
        with Store.writer(args.dir, args.command_line) as w:
            loader = lambda v: load_router(w.store, v)       # noqa: E731
            if args.action == "rollback":
                v = w.rollback(args.name, loader, args.to)
                msg = f"{args.name}: now serving v{v}"
            else:
                w.remove(args.name, loader)
                msg = f"{args.name}: removed (its versions stay on disk; `crma add` starts a new version)"
            w.commit()
        print(msg)
        return 0
    store = Store(args.dir)
    if args.action == "list" or (args.action == "show" and not args.name):
        m = store.manifest
        bb = m["backbone"]
        print(f"store {store.root}: {m['condition']} on {m['model']['spec']} "
              f"({m['model']['fingerprint']['architecture']}, fingerprint {m['model']['fingerprint'].get('weights_bf16_sha256', '?')})")
        print(f"backbone: {'v' + str(bb['current']) if bb['current'] else 'none'} current, {len(bb['versions'])} versions; "
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
        if args.action == "show":
            print("history:")
            for e in m["log"][-20:]:
                print(f"  {e['time']}  {e['op']:<8} {e.get('domain', '')} "
                      + (f"v{e['version']}" if e.get("version") else ""))
        return 0
    entry = store.manifest["domains"].get(args.name)
    if entry is None:
        raise StoreError(f"{store.root}: no domain {args.name!r} (domains: {', '.join(store.domains()) or 'none'})")
    print(json.dumps({"domain": args.name, **entry, "versions": {
        v: meta for v, meta in store.manifest["adapters"][entry["adapter"]].items() if meta["domain"] == args.name}},
        indent=2))
    return 0


def cmd_eval(args: argparse.Namespace, device) -> int:
    from .. import runtime
    from .evaluation import evaluate_store, format_eval

    runtime.accelerator(device)
    store = Store(args.store)
    data = {}
    for item in args.data:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--data: expected NAME=HOLDOUT, got {item!r}")
        data[name] = path
    if args.backbone == "both":
        modes = ("pinned", "latest") if store.manifest["backbone"]["current"] else ("pinned",)
    else:
        modes = (args.backbone,)
    rows = evaluate_store(store, data, modes, live=store.live(device))
    if runtime.is_main():
        print(format_eval(rows, store))
    return 0


def cmd_generate(args: argparse.Namespace, device) -> int:
    from .generate import choose_domain

    store = Store(args.store)
    live = store.live(device)
    domain, confidence, runner_up = choose_domain(live, args.prompt, args.domain)
    if args.domain == "auto":
        extra = f", runner-up {runner_up}" if runner_up else ""
        conf = f" (confidence {confidence:.3f}{extra})" if confidence is not None else ""
        print(f"[router: {domain}{conf}]", file=sys.stderr, flush=True)
    gen = store.generate(args.prompt, domain=domain, backbone=args.backbone, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed, raw=args.raw,
                         on_text=lambda piece: print(piece, end="", flush=True))
    print()
    print(f"[{gen.new_tokens} tokens in {gen.seconds:.1f}s, {gen.domain}"
          + (f" adapter v{gen.adapter_version}" if gen.adapter_version else "")
          + (f", backbone v{gen.backbone_version} ({args.backbone})" if gen.backbone_version else "") + "]",
          file=sys.stderr)
    return 0


def add_store_parsers(sub, add_config_options, dispatch) -> None:
    """The store's subcommands on the `crma` parser (`add_config_options` from crma.cli; `dispatch(args)` runs them)."""
    add = sub.add_parser("add", help="train a domain's adapter onto a model store and register it",
                         description="Train a fresh adapter for one domain (modular: the backbone trains too and "
                                     "becomes a new version), check it against the base model, register it.")
    add.add_argument("--store", type=Path, required=True, help="store folder (created by the first add)")
    add.add_argument("--domain", required=True, help="domain name: [a-z0-9][a-z0-9_-]{0,63}")
    add.add_argument("--data", required=True, metavar="TRAIN[:HOLDOUT]",
                     help=".jsonl (text field), .txt (blank-line separated) or a folder; without HOLDOUT 10%% is held out")
    add.add_argument("--model", default=None, help="base model of a new store (default smollm2-135m)")
    add.add_argument("--condition", choices=("modular", "frozen"), default=None, help="of a new store (default modular)")
    add.add_argument("--min-gain", type=float, default=0.0,
                     help="register only if the holdout loss beats the base model's by this many percent (default 0)")
    add.add_argument("--seed", type=int, default=0)
    add_config_options(add, sections=("train", "lora", "crma", "device"))
    add.set_defaults(func=dispatch, store_cmd="add")

    store = sub.add_parser("store", help="list, show, roll back or remove a store's domains")
    actions = store.add_subparsers(dest="action", required=True)
    for name, help_ in (("list", "domains and their current versions"), ("show", "the store, or one domain's versions"),
                        ("rollback", "serve a domain's earlier version"), ("remove", "stop serving a domain")):
        p = actions.add_parser(name, help=help_)
        p.add_argument("dir", type=Path)
        if name != "list":
            p.add_argument("name", nargs="?" if name == "show" else None)
        if name == "rollback":
            p.add_argument("--to", default=None, help="version (default: the one before the current)")
        p.set_defaults(func=dispatch, store_cmd="store")

    ev = sub.add_parser("eval", help="per-domain holdout loss now, beside the loss recorded at registration")
    ev.add_argument("--store", type=Path, required=True)
    ev.add_argument("--data", nargs="+", required=True, metavar="NAME=HOLDOUT")
    ev.add_argument("--backbone", choices=("pinned", "latest", "both"), default="both")
    add_config_options(ev, sections=("device",), hidden=("gradient_checkpointing",))   # --fsdp: launched eval
    ev.set_defaults(func=dispatch, store_cmd="eval")

    gen = sub.add_parser("generate", help="generate text from a store, routed to a domain adapter")
    gen.add_argument("--store", type=Path, required=True)
    gen.add_argument("--domain", default="auto", help="a domain, auto (the router picks) or base (no adapter)")
    gen.add_argument("--backbone", choices=("pinned", "latest"), default="pinned")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (deterministic)")
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--raw", action="store_true", help="no chat template")
    gen.add_argument("prompt")
    add_config_options(gen, sections=("device",), hidden=("gradient_checkpointing", "fsdp"))
    gen.set_defaults(func=dispatch, store_cmd="generate")


def run_store_command(args: argparse.Namespace, configs_from_args) -> int:
    if args.store_cmd == "add":
        return cmd_add(args, configs_from_args(args, ("train", "lora", "crma", "device")))
    if args.store_cmd == "store":
        return cmd_store(args)
    device = configs_from_args(args, ("device",))["device"]
    return {"eval": cmd_eval, "generate": cmd_generate}[args.store_cmd](args, device)

