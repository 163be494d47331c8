"""`crma <command>`: one CLI whose options are generated from the config dataclasses.

    crma run   --model M --domains NAME=TRAIN[:HOLDOUT] ... --condition C --seed S --out DIR
    crma demo  [--out DIR] [--model M]          short naive vs modular run on the bundled demo data
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .config import CONDITIONS, ConfigError, CRMAConfig, DomainSpec, LoraSettings, RunConfig, TrainConfig

# (dataclass, option prefix, RunConfig attribute)
SECTIONS = ((TrainConfig, "", "train"), (LoraSettings, "lora-", "lora"), (CRMAConfig, "crma-", "crma"))


def _field_type(f: dataclasses.Field):
    """argparse type of a config field (annotations are strings under `from __future__`)."""
    name = f.type if isinstance(f.type, str) else f.type.__name__
    if name.startswith("tuple"):
        return lambda s: tuple(x for x in s.split(",") if x)
    return {"int": int, "float": float, "str": str}[name]


def add_config_options(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """One --option per field of TrainConfig, LoraSettings (--lora-*) and CRMAConfig (--crma-*)."""
    defaults = defaults or {}
    for cls, prefix, section in SECTIONS:
        group = parser.add_argument_group(f"{section} settings")
        base = defaults.get(section, cls())
        for f in dataclasses.fields(cls):
            default = getattr(base, f.name)
            group.add_argument(f"--{prefix}{f.name.replace('_', '-')}", dest=f"{section}.{f.name}",
                               type=_field_type(f), default=default, metavar=f.name.upper(),
                               help=f"(default: {default})")


def configs_from_args(args: argparse.Namespace) -> dict:
    """{'train': TrainConfig, 'lora': LoraSettings, 'crma': CRMAConfig} from parsed options."""
    out = {}
    for cls, _, section in SECTIONS:
        values = {f.name: getattr(args, f"{section}.{f.name}") for f in dataclasses.fields(cls)}
        out[section] = cls(**values)
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from .run import continual_run
    cfg = RunConfig(domains=[DomainSpec.parse(d) for d in args.domains], out=args.out, model=args.model,
                    condition=args.condition, seed=args.seed, **configs_from_args(args))
    continual_run(cfg)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(out=args.out, model=args.model, conditions=args.conditions.split(","), seed=args.seed,
             **configs_from_args(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .demo import DEMO_DEFAULTS
    from .models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="crma", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="continual run over domains in order, with forgetting metrics")
    run.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local dir, smollm2-135m or tiny:<family>")
    run.add_argument("--domains", nargs="+", required=True, metavar="NAME=TRAIN[:HOLDOUT]")
    run.add_argument("--condition", choices=CONDITIONS, default="modular")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", type=Path, required=True)
    add_config_options(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="short naive vs modular run on the bundled demo data")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--conditions", default="naive,modular")
    demo.add_argument("--seed", type=int, default=0)
    add_config_options(demo, DEMO_DEFAULTS)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .models import ModelError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, ModelError, FileNotFoundError) as err:
        print(f"crma {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
