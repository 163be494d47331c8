"""`crma serve`: the command line of the server (wired into crma/cli.py by `add_serve_parser`).

    crma serve --store DIR [--host 127.0.0.1] [--port 8000] [--admin-token TOKEN] [--max-batch N] [--watch]

Also runnable alone: `python -m crma.serve.cli --store DIR ...`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..config import DeviceConfig
from .config import ServeConfig


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Define `crma serve` on a `crma` subparsers object; its handler is args.func(args) -> exit code."""
    p = subparsers.add_parser(
        "serve", help="serve a model store over an OpenAI-compatible HTTP API (routing, mixed batches, hot add)",
        description="OpenAI-compatible server for a crma model store: /v1/completions, /v1/chat/completions "
                    "(streaming), /v1/models (every domain, auto, base), /health; POST /admin/reload with "
                    "--admin-token. Requests are batched across adapters and backbone versions.")
    d = ServeConfig(store=Path("."))
    p.add_argument("--store", type=Path, required=True, help="the model store folder")
    p.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"(default {d.port})")
    p.add_argument("--admin-token", default=os.environ.get("CRMA_ADMIN_TOKEN"),
                   help="enables POST /admin/reload with 'Authorization: Bearer TOKEN' (default: $CRMA_ADMIN_TOKEN; "
                        "without a token the admin endpoints do not exist)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help=f"rows decoded together (default {d.max_batch})")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests waiting for a batch slot; beyond it 503 + Retry-After (default {d.max_queue})")
    p.add_argument("--watch", action="store_true", help="reload by itself when the store's manifest changes")
    p.add_argument("--watch-interval", type=float, default=d.watch_interval, help="seconds between manifest checks")
    p.add_argument("--backbone", choices=("pinned", "latest"), default=d.backbone,
                   help="backbone version for each domain: the one its adapter was trained with (default) or the newest")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                   help="for chat requests without max_tokens (completions default to 16, as OpenAI's)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--batching", choices=("mixed", "per-adapter"), default=d.batching,
                   help="per-adapter: one adapter at a time (a baseline for benchmarks)")
    p.add_argument("--lora-mixing", choices=("peft", "gather"), default=d.lora_mixing,
                   help="LoRA in a batch of several adapters: PEFT's adapter_names (default) or stacked weights "
                        "gathered per row (faster with many adapters per batch)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (auto: cuda, else mps, else cpu)")
    p.add_argument("--dtype", default="auto", help="auto|float32|bfloat16 (auto: bf16 on a GPU that has it)")
    p.add_argument("--load-in-4bit", action="store_true", help="NF4 base weights (bitsandbytes, CUDA)")
    p.set_defaults(func=cmd_serve)
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_tokens", "default_max_tokens", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    return ServeConfig(store=args.store, host=args.host, port=args.port, admin_token=args.admin_token or None,
                       max_batch=args.max_batch, max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
                       max_tokens=args.max_tokens, default_max_tokens=args.default_max_tokens,
                       max_body_bytes=args.max_body_bytes, watch=args.watch, watch_interval=args.watch_interval,
                       backbone=args.backbone, batching=args.batching, lora_mixing=args.lora_mixing,
                       threads=args.threads,
                       device=DeviceConfig(device=args.device, dtype=args.dtype, load_in_4bit=args.load_in_4bit))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..store import StoreError
    from .app import create_app
    from .server import Server

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = config_from_args(args)
        server = Server.open(cfg)
    except (StoreError, ValueError, FileNotFoundError) as err:
        print(f"crma serve: error: {err}", file=sys.stderr)
        return 2
    print(f"crma serve: {cfg.store} on http://{cfg.host}:{cfg.port}/v1  models: {', '.join(server.registry.current.models())}"
          f"  (batch {cfg.max_batch}, {cfg.batching}{', watching the manifest' if cfg.watch else ''}"
          f"{', admin endpoints on' if cfg.admin_token else ''})", flush=True)
    uvicorn.run(create_app(server), host=cfg.host, port=cfg.port, log_level=args.log_level,
                timeout_graceful_shutdown=30)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crma")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
