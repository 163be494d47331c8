"""`crma bench` and `crma report`: the benchmark grid (conditions x seeds) and its report.

    crma bench --protocol paper|cpu|smoke --out DIR [--corpus DIR] [--resume] [--jobs N]
    crma report --out DIR            recompute summary.json / report.md / plots from the run folders
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..bench.grid import PROTOCOLS, run_grid
from ..bench.report import write_all
from ..config import ConfigError
from .options import add_options, build, opt
from .settings import add_sections, sections

BENCH_SECTIONS = ("crma", "cl", "device")       # the CRMA / baseline settings to compare, and where it runs


@dataclass
class BenchArgs:
    protocol: str = opt(choices=tuple(PROTOCOLS))
    out: Path = opt(help="the grid's folder: one run folder per condition and seed, summary.json, report.md")
    corpus: Path | None = opt(None, help="folder with <domain>/{train,holdout}.jsonl (default: the repository's "
                                         "benchmarks/corpora/cl5; smoke: the bundled demo data)")
    model: str | None = opt(None, help="override the protocol's model")
    conditions: str | None = opt(None, help="comma list (default: the protocol's; naive,frozen,modular for paper "
                                            "and cpu, every condition for smoke); baselines: ewc, replay, olora")
    seeds: str | None = opt(None, help="comma list (default: the protocol's seeds)")
    epochs: int | None = opt(None, help="override the protocol's epochs per domain (recorded in protocol.json; a "
                                        "folder holds one value: finished runs made with another are refused)")
    resume: bool = opt(False, help="skip runs whose results.json is finished")
    jobs: int = opt(1, help="runs at once, each in its own single-threaded process (2 on a 2-core machine: ~1.4x "
                            "the throughput of one 2-thread process); per-run bars are off when > 1")
    quiet: bool = opt(False, help="no progress lines or per-run bars")
    micro_batch_size: int = opt(0, help="rows per forward in each process (0: its whole share of the global "
                                        "batch); changes memory, not the math")


@dataclass
class ReportArgs:
    out: Path = opt(help="a benchmark folder")


def cmd_bench(args: argparse.Namespace) -> int:
    a = build(args, BenchArgs)
    seeds = [int(s) for s in a.seeds.split(",") if s] if a.seeds else None
    conditions = [c for c in a.conditions.split(",") if c] if a.conditions else None
    protocol = PROTOCOLS[a.protocol]
    if a.epochs is not None:
        if a.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {a.epochs}")
        protocol = dataclasses.replace(protocol, epochs=a.epochs)
    run_grid(protocol, out=a.out, corpus=a.corpus, model=a.model, conditions=conditions, seeds=seeds,
             resume=a.resume, progress=not a.quiet, command=args.command_line, jobs=a.jobs,
             micro_batch_size=a.micro_batch_size, **sections(args, BENCH_SECTIONS))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    a = build(args, ReportArgs)
    if not a.out.is_dir():
        raise FileNotFoundError(f"{a.out}: no such benchmark folder")
    summary = write_all(a.out)
    print(f"crma report: {summary['n_finished']} finished runs -> {a.out / 'summary.json'}, {a.out / 'report.md'}")
    return 0


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmark grid (conditions x seeds) with summary.json and report.md",
                           description="Protocols: " + "; ".join(
                               f"{p.name}: {p.model}, {len(p.domains)} domains, {p.train_passages}/"
                               f"{p.holdout_passages} passages, max_len {p.max_len}, {p.epochs} epoch(s)"
                               for p in PROTOCOLS.values()) + ". See docs/benchmark.md.")
    add_options(bench, BenchArgs)
    add_sections(bench, BENCH_SECTIONS)
    bench.set_defaults(func=cmd_bench)

    report = sub.add_parser("report", help="recompute summary.json, report.md and plots of a bench folder")
    add_options(report, ReportArgs)
    report.set_defaults(func=cmd_report)
