"""`crma route` and `crma route-eval`: argparse builders and handlers (wired into crma/cli.py).

    crma route --store DIR "query" ...          domain, confidence, runner-up (and why it abstained)
    crma route-eval --store DIR --corpus DIR [--queries NAME=FILE ...] [--ood FILE ...] [--loss]

A router can come from a store (--store DIR: its current router and base model), a `crma run` folder
(--run DIR: a store, or an older run folder with router/ and results.json), or a router folder plus a model
spec (--router FOLDER --model SPEC). A store's base model is always opened (that checks the store is whole
and on the model it names); with the default MiniLM encoder the features do not read it.

Standalone: `python -m crma.routing.cli route --store DIR "query"` (same options and exit codes).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .router import BASE, Router, RouterError

REASONS_TEXT = {"characters": "too few characters per token (character noise)",
                "background": "closer to everyday text than to any domain",
                "distance": "too far from every domain",
                "empty": "empty query"}


@dataclass
class Source:
    """Where a router came from, with what computes its features."""
    router: Router
    model: object | None          # base model (None: not needed by the router's encoder)
    tokenizer: object | None
    label: str                    # for reports
    folder: Path | None           # the run/store folder (None for --router)
    kind: str                     # store | run | router
    device: object | None = None  # DeviceConfig of the model loads (--device, --dtype)


def open_store(path: Path):
    """crma.store.open_store(DIR), behind one function so the wiring can change in one place."""
    from ..store import open_store as _open
    return _open(path)


def _base_model(needs: bool, spec: str | None, seed: int, device=None):
    if not needs:
        return None, None
    from ..runtime import load_placed
    return load_placed(spec, device, seed=seed)


def _device(args: argparse.Namespace):
    from ..config import DeviceConfig
    return DeviceConfig(device=getattr(args, "device", "auto"), dtype=getattr(args, "dtype", "auto"))


def resolve_source(args: argparse.Namespace, need_model: bool = False) -> Source:
    """The router (and, when its encoder needs it or `need_model`, the base model) that args name."""
    device = _device(args)
    given = [x for x in ("store", "run", "router") if getattr(args, x, None) is not None]
    if len(given) != 1:
        raise RouterError("give exactly one of --store DIR, --run DIR or --router FOLDER (with --model SPEC)")
    if args.router is not None:
        router = Router.load(args.router)
        needs = need_model or router.cfg.encoder == "base"
        spec = args.model or router.meta.get("model")
        if needs and not spec:
            raise RouterError("--router: give --model SPEC (the base model the router was built for)")
        model, tok = _base_model(needs, spec, 0, device)
        return Source(router, model, tok, str(args.router), None, "router", device)
    folder = Path(args.store if args.store is not None else args.run)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such {'store' if args.store is not None else 'run'} directory")
    legacy = (folder / "router" / "router.json").exists() and not (folder / "manifest.json").exists()
    if args.run is not None and legacy:            # a run folder from before the model store
        router = Router.load(folder)
        info = json.loads((folder / "results.json").read_text(encoding="utf-8")) \
            if (folder / "results.json").exists() else {}
        needs = need_model or router.cfg.encoder == "base"
        model, tok = _base_model(needs, info.get("model") or router.meta.get("model"), int(info.get("seed", 0)), device)
        return Source(router, model, tok, str(folder), folder, "run", device)
    store = open_store(folder)
    router = store.router()
    if router is None or not router.names:
        raise RouterError(f"{folder}: the store has no router yet (no domain added)")
    model, tok = store.base(device)  # always: opening the base model checks the store's model identity
    return Source(router, model, tok, str(folder), folder, "store", device)


def add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, default=None, help="a model store: its current router")
    p.add_argument("--run", type=Path, default=None, help="a `crma run` output folder (a store, or an older run)")
    p.add_argument("--router", type=Path, default=None, help="a router folder (router.json + router.safetensors)")
    p.add_argument("--model", default=None, help="with --router: the base model spec (when its encoder needs it)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps for the base model (auto: cuda, else mps, else cpu)")
    p.add_argument("--dtype", default="auto", help="auto|float32|bfloat16 (auto: bf16 on a GPU that has it)")


def _threads(args) -> None:
    if getattr(args, "threads", 0):
        import torch
        torch.set_num_threads(args.threads)


def describe(dec, adapter: str | None) -> str:
    """One line a person reads: domain, confidence, runner-up, adapter; for base, why it abstained, and the
    best domain as the runner-up (with its confidence among the domains)."""
    if dec.domain != BASE:
        runner = f"{dec.runner_up} ({dec.runner_up_confidence:.3f})" if dec.runner_up else "-"
        return (f"domain: {dec.domain}  confidence: {dec.confidence:.3f}  runner-up: {runner}  "
                f"adapter: {adapter or 'none'}")
    conf = f"{dec.background_confidence:.3f}" if dec.reason == "background" else "-"
    runner = f"{dec.best} ({dec.confidence:.3f})" if dec.best else "-"
    why = REASONS_TEXT.get(dec.reason, dec.reason)
    if dec.reason == "distance":
        why += f": {dec.best} at {dec.ood_ratio:.2f} x its threshold"
    return f"domain: base  confidence: {conf}  runner-up: {runner}  adapter: none  (abstained: {why})"


def cmd_route(args: argparse.Namespace) -> int:
    from . import route_texts

    for k, q in enumerate(args.queries, 1):
        if not q.strip():
            raise RouterError(f"query {k} is empty (or only whitespace): nothing to route")
    _threads(args)
    src = resolve_source(args)
    decisions = route_texts(src.router, src.model, src.tokenizer, args.queries)
    for text, dec in zip(args.queries, decisions):
        adapter = src.router.adapter_for(dec.domain)
        if args.json:
            print(json.dumps({"query": text, **dec._asdict(), "adapter": adapter}))
        else:
            print(describe(dec, adapter))
    return 0


def _named_files(values: list[str] | None, what: str) -> list[tuple[str, Path]]:
    out = []
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise RouterError(f"{what} {v!r}: expected NAME=FILE")
        out.append((name, Path(path)))
    return out


def cmd_route_eval(args: argparse.Namespace) -> int:
    from .route_eval import format_report, route_eval

    _threads(args)
    queries = _named_files(args.queries, "--queries")
    if args.corpus is None and not queries and not args.ood:
        raise RouterError("nothing to evaluate: give --corpus DIR, --queries NAME=FILE or --ood FILE")
    src = resolve_source(args, need_model=False)
    report = route_eval(src, corpus=args.corpus, queries=queries, ood=[Path(p) for p in args.ood or []],
                        loss=args.loss, max_queries=args.max_queries, max_holdout=args.max_holdout,
                        seed=args.seed, n_random=args.n_random, builtin_ood=not args.no_builtin_ood,
                        command=getattr(args, "command_line", ""))
    print(format_report(report))
    out = args.out
    if out is None and src.kind == "run":
        out = src.folder / "route_eval.json"
    if out is not None:
        from ..io import write_json
        write_json(out, report)
        print(f"wrote {out}")
    return 0


def add_route_parsers(subparsers) -> None:
    """`crma route` and `crma route-eval` (all their options) on an argparse subparsers object."""
    route = subparsers.add_parser("route", help="route queries: domain, confidence, runner-up (or base, and why)")
    add_source_options(route)
    route.add_argument("--json", action="store_true", help="one JSON object per query")
    route.add_argument("queries", nargs="+", metavar="QUERY")
    route.set_defaults(func=cmd_route)

    ev = subparsers.add_parser("route-eval", help="router accuracy, out-of-domain abstention, latency, "
                                                  "and (--loss) routed vs oracle holdout loss")
    add_source_options(ev)
    ev.add_argument("--corpus", type=Path, default=None,
                    help="folder with <domain>/queries.jsonl (domains the router lacks count as out-of-domain)")
    ev.add_argument("--queries", action="append", metavar="NAME=FILE",
                    help="labelled queries of domain NAME (.jsonl with 'text', or plain text one a line); "
                         "repeatable; NAME=base marks a set that should go to base")
    ev.add_argument("--ood", action="append", metavar="FILE",
                    help="out-of-domain queries, plain text one a line (or .jsonl); repeatable")
    ev.add_argument("--no-builtin-ood", action="store_true",
                    help="leave out the built-in non-English and domain-free English sentences")
    ev.add_argument("--loss", action="store_true", help="also holdout loss, routed vs oracle adapters (--run/--store)")
    ev.add_argument("--max-queries", type=int, default=0, help="queries per labelled set (0 = all)")
    ev.add_argument("--max-holdout", type=int, default=100, help="holdout passages per domain for --loss")
    ev.add_argument("--seed", type=int, default=0, help="seed of the random-string OOD inputs")
    ev.add_argument("--n-random", type=int, default=50, help="number of random-string OOD inputs (0 = none)")
    ev.add_argument("--out", type=Path, default=None,
                    help="write the report here as JSON (default: DIR/route_eval.json for an older --run folder)")
    ev.set_defaults(func=cmd_route_eval)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (python -m crma.routing.cli): the same exit codes as `crma`."""
    from ..config import ConfigError
    from ..data import DataError
    from ..io import command_line
    from ..method.models import ModelError

    parser = argparse.ArgumentParser(prog="crma")
    add_route_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.command_line = command_line(list(sys.argv[1:] if argv is None else argv))
    errors = (ConfigError, DataError, ModelError, RouterError, FileNotFoundError)
    try:
        from ..store import StoreError
        errors += (StoreError,)
    except ImportError:            # pragma: no cover - before the store exists
        pass
    try:
        return args.func(args)
    except errors as err:
        print(f"crma {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
