"""`crma <command>`: one command line over every job; each command's options are generated from dataclasses
(crma/cli/options.py).

    crma run   --domains NAME=TRAIN[:HOLDOUT] ... --out DIR [--condition C]    continual run with forgetting metrics
    crma add   --store DIR --domain NAME --data TRAIN[:HOLDOUT]    add a domain to a model store
    crma store list|show|rollback|remove DIR [NAME]              inspect or change a store
    crma eval  --store DIR --data NAME=HOLDOUT ...                losses now vs at registration
    crma generate --store DIR [--domain NAME|auto|base] "prompt"  routed, streamed generation
    crma serve --store DIR [--port 8000] [--admin-token-file F] [--watch]   OpenAI-compatible HTTP server
    crma demo  [--out DIR] [--model M]          short naive vs modular run on the bundled demo data
    crma bench --protocol paper|cpu|smoke --out DIR [--corpus DIR] [--resume]   benchmark grid + report
    crma report --out DIR                        recompute summary.json / report.md from the run folders
    crma route --store DIR "query text" ...      which domain adapter the store's router picks
    crma route-eval --store DIR [--corpus DIR] [--queries NAME=FILE] [--ood FILE] [--loss]
    crma export --store DIR --to vllm --out DIR2 [--backbone pinned|latest]   files vLLM serves the store from
    crma route-proxy --store DIR --upstream URL   the store's router in front of vLLM (OpenAI API)
"""
from __future__ import annotations

import argparse
import sys

from .. import runtime
from ..config import ConfigError
from ..data import DataError
from ..export.lora import ExportError
from ..io import command_line
from ..method.backbone import FingerprintError
from ..method.models import ModelError
from ..routing import RouterError
from ..store import StoreError
from . import bench, export, proxy, route, serve, store, train

ERRORS = (ConfigError, DataError, ExportError, ModelError, RouterError, FingerprintError, StoreError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crma", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (train, store, serve, bench, route, export, proxy):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = command_line(list(sys.argv[1:] if argv is None else argv))  # recorded in results
    ok = False
    try:
        code = args.func(args)
        ok = True
        return code
    except ERRORS as err:
        print(f"crma {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        runtime.finish(ok)                   # launched processes: leave the process group together


if __name__ == "__main__":
    sys.exit(main())
