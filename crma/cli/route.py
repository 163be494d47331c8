"""`crma route` and `crma route-eval`: which domain a store's router picks, and how well it routes.

    crma route --store DIR "query" ...          domain, confidence, runner-up (and why it abstained)
    crma route-eval --store DIR --corpus DIR [--queries NAME=FILE ...] [--ood FILE ...] [--loss]

A router comes from a store (--store DIR: its current router, on the store's base model) or from a router
folder plus a model spec (--router FOLDER --model SPEC). A store's base model is always opened (that checks
the store is whole and on the model it names); with the default MiniLM encoder the features do not read it.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DeviceConfig
from ..engine.route_eval import format_report, open_source, route_eval
from ..io import write_json
from ..routing import BASE, RouterError, route_texts
from ..serve.route_log import format_summary, read_records, summarise
from .options import add_options, build, named, opt

REASONS_TEXT = {"characters": "too few characters per token (character noise)",
                "background": "closer to everyday text than to any domain",
                "distance": "too far from every domain",
                "empty": "empty query"}


@dataclass
class SourceArgs:
    store: Path | None = opt(None, help="a model store: its current router")
    router: Path | None = opt(None, help="a router folder (router.json + router.safetensors)")
    model: str | None = opt(None, help="with --router: the base model spec (when its encoder needs it)")
    threads: int = opt(0, help="torch threads (0: leave as is)")
    device: str = opt("auto", help="auto|cpu|cuda|mps for the base model (auto: cuda, else mps, else cpu)")
    dtype: str = opt("auto", help="auto|float32|bfloat16 (auto: bf16 on a GPU that has it)")

    def open(self):
        if self.threads:
            torch.set_num_threads(self.threads)
        return open_source(self.store, self.router, self.model, DeviceConfig(device=self.device, dtype=self.dtype))


@dataclass(kw_only=True)
class RouteArgs(SourceArgs):
    json: bool = opt(False, help="one JSON object per query")
    queries: list[str] = opt(positional=True, metavar="QUERY")


@dataclass
class RouteEvalArgs(SourceArgs):
    corpus: Path | None = opt(None, help="folder with <domain>/queries.jsonl (domains the router lacks count as "
                                         "out-of-domain)")
    queries: list[str] | None = opt(None, metavar="NAME=FILE",
                                    help="labelled queries of domain NAME (.jsonl with 'text', or plain text one a "
                                         "line); NAME=base marks a set that should go to base")
    ood: list[str] | None = opt(None, metavar="FILE", help="out-of-domain queries, plain text one a line (or .jsonl)")
    builtin_ood: bool = opt(True, help="the built-in non-English and domain-free English sentences")
    loss: bool = opt(False, help="also holdout loss, routed vs oracle adapters (--store)")
    max_queries: int = opt(0, help="queries per labelled set (0 = all)")
    max_holdout: int = opt(100, help="holdout passages per domain for --loss")
    seed: int = opt(0, help="seed of the random-string OOD inputs")
    n_random: int = opt(50, help="number of random-string OOD inputs (0 = none)")
    out: Path | None = opt(None, help="write the report here as JSON")


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
    a = build(args, RouteArgs)
    for k, q in enumerate(a.queries, 1):
        if not q.strip():
            raise RouterError(f"query {k} is empty (or only whitespace): nothing to route")
    src = a.open()
    decisions = route_texts(src.router, src.model, src.tokenizer, a.queries)
    for text, dec in zip(a.queries, decisions, strict=False):
        adapter = src.router.adapter_for(dec.domain)
        if a.json:
            print(json.dumps({"query": text, **dec._asdict(), "adapter": adapter}))
        else:
            print(describe(dec, adapter))
    return 0


def cmd_route_eval(args: argparse.Namespace) -> int:
    a = build(args, RouteEvalArgs)
    queries = [(name, Path(path)) for name, path in named(a.queries or [], "--queries").items()]
    if a.corpus is None and not queries and not a.ood:
        raise RouterError("nothing to evaluate: give --corpus DIR, --queries NAME=FILE or --ood FILE")
    src = a.open()
    report = route_eval(src, corpus=a.corpus, queries=queries, ood=[Path(p) for p in a.ood or []], loss=a.loss,
                        max_queries=a.max_queries, max_holdout=a.max_holdout, seed=a.seed, n_random=a.n_random,
                        builtin_ood=a.builtin_ood, command=args.command_line)
    print(format_report(report))
    if a.out is not None:
        write_json(a.out, report)
        print(f"wrote {a.out}")
    return 0


@dataclass
class RouteLogArgs:
    log: Path = opt(positional=True, help="the routing log of crma serve --route-log")
    low_confidence: float = opt(0.6, help="router confidence below which an auto request counts as doubtful")
    json: bool = opt(False, help="print the summary as JSON")


def cmd_route_log(args: argparse.Namespace) -> int:
    a = build(args, RouteLogArgs)
    summary = summarise(read_records(a.log), a.low_confidence)
    print(json.dumps(summary, indent=2) if a.json else format_summary(summary))
    return 0


def register(sub) -> None:
    route = sub.add_parser("route", help="route queries: domain, confidence, runner-up (or base, and why)")
    add_options(route, RouteArgs)
    route.set_defaults(func=cmd_route)

    ev = sub.add_parser("route-eval", help="router accuracy, out-of-domain abstention, latency, "
                                           "and (--loss) routed vs oracle holdout loss")
    add_options(ev, RouteEvalArgs)
    ev.set_defaults(func=cmd_route_eval)

    rl = sub.add_parser("route-log", help="summarise crma serve's routing log: share per domain, abstentions, "
                                          "low-confidence requests")
    add_options(rl, RouteLogArgs)
    rl.set_defaults(func=cmd_route_log)
