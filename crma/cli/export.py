"""`crma export`: a model store as files another serving engine runs.

    crma export --store DIR --to vllm --out DIR2 [--backbone pinned|latest] [--max-loras K]

Writes DIR2/base (the base model, safetensors), DIR2/loras/* (one PEFT LoRA per served adapter version; a
modular store's on its backbone version), DIR2/export.json and DIR2/launch.sh (the `vllm serve` command).
Run again after `crma add`: only the folders whose sources changed are written (docs/vllm.md).
"""
from __future__ import annotations

import argparse

from ..export.vllm import ExportConfig, export_store
from .options import add_options, build


def cmd_export(args: argparse.Namespace) -> int:
    cfg = build(args, ExportConfig)
    record = export_store(cfg)
    print(f"crma export: {record['store']} ({record['condition']}, {record['model']}, manifest updated "
          f"{record['manifest']['updated']}) -> {cfg.out}")
    print(f"  written: {', '.join(record['written']) or 'nothing (all up to date)'}")
    if record["kept"]:
        print(f"  unchanged: {', '.join(record['kept'])}")
    if record["stale"]:
        print(f"  no longer served (left in place): {', '.join(record['stale'])}")
    for model, entry in record["models"].items():
        bb = f" on backbone v{entry['backbone_version']}" if entry["backbone_version"] else ""
        print(f"  {model:<16} {entry['lora']}{bb}")
    if record["plugin_architecture"]:
        print("  a modular store: vLLM needs the crma plugin (`pip install --no-deps crma` in vLLM's environment, "
              "docs/vllm.md)")
    print(f"  launch: {cfg.out}/launch.sh [vllm serve options]")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="export a model store for vLLM (base model, LoRA folders, launch command)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, ExportConfig)
    p.set_defaults(func=cmd_export)
