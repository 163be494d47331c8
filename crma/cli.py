"""`crma <command>`: one CLI whose options are generated from the config dataclasses.

    crma run   --model M --domains NAME=TRAIN[:HOLDOUT] ... --condition C --seed S --out DIR
    crma add   --store DIR --domain NAME --data TRAIN[:HOLDOUT]    add a domain to a model store
    crma store list|show|rollback|remove DIR [NAME]              inspect or change a store
    crma eval  --store DIR --data NAME=HOLDOUT ...                losses now vs at registration
    crma generate --store DIR [--domain NAME|auto|base] "prompt"  routed, streamed generation
    crma serve --store DIR [--port 8000] [--admin-token T] [--watch] OpenAI-compatible HTTP server
    crma demo  [--out DIR] [--model M]          short naive vs modular run on the bundled demo data
    crma bench --protocol paper|cpu|smoke --out DIR [--corpus DIR] [--resume]   benchmark grid + report
    crma report --out DIR                        recompute summary.json / report.md from the run folders
    crma route --store DIR "query text" ...      which domain adapter the store's router picks
    crma route-eval --store DIR [--corpus DIR] [--queries NAME=FILE] [--ood FILE] [--loss]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .config import (ALL_CONDITIONS, CLConfig, ConfigError, CRMAConfig, DeviceConfig, DomainSpec, LoraSettings,
                     RunConfig, TrainConfig)
from .io import command_line

# (dataclass, option prefix, RunConfig attribute)
SECTIONS = ((TrainConfig, "", "train"), (LoraSettings, "lora-", "lora"), (CRMAConfig, "crma-", "crma"),
            (CLConfig, "cl-", "cl"), (DeviceConfig, "", "device"))
RUN_SECTIONS = ("train", "lora", "crma", "cl", "device")   # crma run: every section (cl: the baseline conditions)


def _field_type(f: dataclasses.Field):
    """argparse type of a config field (annotations are strings under `from __future__`)."""
    name = f.type if isinstance(f.type, str) else f.type.__name__
    if name.startswith("tuple"):
        return lambda s: tuple(x for x in s.split(",") if x)
    return {"int": int, "float": float, "str": str}[name]


def _add_options(parser: argparse.ArgumentParser, cls, prefix: str, section: str, base, hidden=()) -> None:
    """One --{prefix}{field} option per field of dataclass `cls`, defaulting to `base`'s values,
    stored as args.<section>.<field> (read back by _from_args); fields in `hidden` stay out of --help."""
    group = parser.add_argument_group(f"{section} settings")
    for f in dataclasses.fields(cls):
        default = getattr(base, f.name)
        if f.type in ("bool", bool):
            group.add_argument(f"--{prefix}{f.name.replace('_', '-')}", dest=f"{section}.{f.name}",
                               action=argparse.BooleanOptionalAction, default=default,
                               help=argparse.SUPPRESS if f.name in hidden else f"(default: {default})")
            continue
        group.add_argument(f"--{prefix}{f.name.replace('_', '-')}", dest=f"{section}.{f.name}",
                           type=_field_type(f), default=default, metavar=f.name.upper(),
                           help=f"(default: {default})")


def _from_args(args: argparse.Namespace, cls, section: str):
    return cls(**{f.name: getattr(args, f"{section}.{f.name}") for f in dataclasses.fields(cls)})


def add_config_options(parser: argparse.ArgumentParser, defaults: dict | None = None,
                       sections: tuple[str, ...] = ("train", "lora", "crma"), hidden: tuple[str, ...] = ()) -> None:
    """One --option per field of TrainConfig, LoraSettings (--lora-*), CRMAConfig (--crma-*), CLConfig
    (--cl-*) and DeviceConfig (--device, --dtype, ...), for the sections named."""
    defaults = defaults or {}
    for cls, prefix, section in (s for s in SECTIONS if s[2] in sections):
        _add_options(parser, cls, prefix, section, defaults.get(section, cls()), hidden)


def configs_from_args(args: argparse.Namespace, sections: tuple[str, ...] = ("train", "lora", "crma")) -> dict:
    """{'train': TrainConfig, 'lora': LoraSettings, 'crma': CRMAConfig} from parsed options."""
    return {section: _from_args(args, cls, section) for cls, _, section in SECTIONS if section in sections}


def add_router_options(parser: argparse.ArgumentParser) -> None:
    """One --router-* option per field of RouterConfig (issue 4)."""
    from .routing.router import RouterConfig
    _add_options(parser, RouterConfig, "router-", "router", RouterConfig())


def router_config_from_args(args: argparse.Namespace):
    from .routing.router import RouterConfig
    return _from_args(args, RouterConfig, "router")


def cmd_run(args: argparse.Namespace) -> int:
    from .run import continual_run
    cfg = RunConfig(domains=[DomainSpec.parse(d) for d in args.domains], out=args.out, model=args.model,
                    condition=args.condition, seed=args.seed, **configs_from_args(args, RUN_SECTIONS))
    continual_run(cfg, command=args.command_line, router_cfg=router_config_from_args(args), overwrite=args.overwrite)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(out=args.out, model=args.model, conditions=args.conditions.split(","), seed=args.seed,
             command=args.command_line, **configs_from_args(args))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.grid import PROTOCOLS, run_grid
    seeds = [int(s) for s in args.seeds.split(",") if s] if args.seeds else None
    conditions = [c for c in args.conditions.split(",") if c] if args.conditions else None
    protocol = PROTOCOLS[args.protocol]
    if args.epochs is not None:
        if args.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
        protocol = dataclasses.replace(protocol, epochs=args.epochs)
    run_grid(protocol, out=args.out, corpus=args.corpus, model=args.model,
             conditions=conditions, seeds=seeds, resume=args.resume, progress=not args.quiet,
             command=args.command_line, jobs=args.jobs, micro_batch_size=args.micro_batch_size,
             **configs_from_args(args, ("crma", "cl", "device")))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .bench.report import write_all
    if not args.out.is_dir():
        raise FileNotFoundError(f"{args.out}: no such benchmark folder")
    summary = write_all(args.out)
    print(f"crma report: {summary['n_finished']} finished runs -> {args.out / 'summary.json'}, "
          f"{args.out / 'report.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .demo import DEMO_DEFAULTS
    from .method.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="crma", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="continual run over domains in order, with forgetting metrics")
    run.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local dir, smollm2-135m or tiny:<family>")
    run.add_argument("--domains", nargs="+", required=True, metavar="NAME=TRAIN[:HOLDOUT]")
    run.add_argument("--condition", choices=ALL_CONDITIONS, default="modular",
                     help="naive, frozen, modular; or a continual-learning baseline: ewc, replay, olora (--cl-*)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", type=Path, required=True, help="the run's folder: a model store plus results.json")
    run.add_argument("--overwrite", action="store_true", help="replace whatever --out holds")
    add_config_options(run, sections=RUN_SECTIONS)
    add_router_options(run)
    run.set_defaults(func=cmd_run)

    from .store.commands import add_store_parsers, run_store_command
    add_store_parsers(sub, add_config_options, lambda a: run_store_command(a, configs_from_args))
    from .serve.cli import add_serve_parser
    add_serve_parser(sub)

    demo = sub.add_parser("demo", help="short naive vs modular run on the bundled demo data")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--conditions", default="naive,modular")
    demo.add_argument("--seed", type=int, default=0)
    add_config_options(demo, DEMO_DEFAULTS)
    demo.set_defaults(func=cmd_demo)

    from .bench.grid import PROTOCOLS
    bench = sub.add_parser("bench", help="benchmark grid (conditions x seeds) with summary.json and report.md",
                           description="Protocols: " + "; ".join(
                               f"{p.name}: {p.model}, {len(p.domains)} domains, {p.train_passages}/"
                               f"{p.holdout_passages} passages, max_len {p.max_len}, {p.epochs} epoch(s)"
                               for p in PROTOCOLS.values()) + ". See benchmarks/README.md.")
    bench.add_argument("--protocol", choices=list(PROTOCOLS), required=True)
    bench.add_argument("--corpus", type=Path, default=None,
                       help="folder with <domain>/{train,holdout}.jsonl (smoke: bundled demo data if omitted)")
    bench.add_argument("--out", type=Path, required=True)
    bench.add_argument("--model", default=None, help="override the protocol's model")
    bench.add_argument("--conditions", default=None,
                       help="comma list (default: the protocol's; naive,frozen,modular for paper and cpu, "
                            "every condition for smoke); baselines: ewc, replay, olora")
    bench.add_argument("--seeds", default=None, help="comma list (default: the protocol's seeds)")
    bench.add_argument("--epochs", type=int, default=None,
                       help="override the protocol's epochs per domain (recorded in protocol.json; a folder "
                            "holds one value: finished runs made with another are refused)")
    bench.add_argument("--resume", action="store_true", help="skip runs whose results.json is finished")
    bench.add_argument("--jobs", type=int, default=1,
                       help="runs at once, each in its own single-threaded process (2 on a 2-core machine: "
                            "~1.4x the throughput of one 2-thread process); per-run bars are off when > 1")
    bench.add_argument("--quiet", action="store_true", help="no progress lines or per-run bars")
    bench.add_argument("--micro-batch-size", type=int, default=0,
                       help="rows per forward in each process (0: its whole share of the global batch); "
                            "changes memory, not the math")
    add_config_options(bench, sections=("crma", "cl", "device"))   # CRMA / baseline settings to compare
    bench.set_defaults(func=cmd_bench)

    report = sub.add_parser("report", help="recompute summary.json, report.md and plots of a bench folder")
    report.add_argument("--out", type=Path, required=True)
    report.set_defaults(func=cmd_report)

    from .routing.cli import add_route_parsers
    add_route_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .method.backbone import FingerprintError
    from .data import DataError
    from .method.models import ModelError
    from .routing.router import RouterError
    from .store.manifest import StoreError

    args = build_parser().parse_args(argv)
    args.command_line = command_line(list(sys.argv[1:] if argv is None else argv))  # recorded in results
    from . import runtime

    ok = False
    try:
        code = args.func(args)
        ok = True
        return code
    except (ConfigError, DataError, ModelError, RouterError, FingerprintError, StoreError, FileNotFoundError) as err:
        print(f"crma {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        runtime.finish(ok)                   # launched processes: leave the process group together


if __name__ == "__main__":
    sys.exit(main())
