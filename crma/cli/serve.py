"""`crma serve`: the OpenAI-compatible server for a model store.

    crma serve --store DIR [--host 127.0.0.1] [--port 8000] [--admin-token TOKEN] [--max-batch N] [--watch]
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

from ..serve.config import ServeConfig
from .options import add_options, build, opt
from .settings import add_sections, sections


@dataclass
class LogArgs:
    log_level: str = opt("info", choices=("debug", "info", "warning", "error"))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn  # heavy (the web stack, 0.5 s to import): only for crma serve

    from ..serve.app import create_app  # heavy, as above (FastAPI)
    from ..serve.server import Server  # heavy, as above

    log = build(args, LogArgs)
    logging.basicConfig(level=getattr(logging, log.log_level.upper()),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = build(args, ServeConfig, device=sections(args, ("device",))["device"])
    cfg.admin_token = cfg.admin_token or os.environ.get("CRMA_ADMIN_TOKEN") or None
    server = Server.open(cfg)
    print(f"crma serve: {cfg.store} on http://{cfg.host}:{cfg.port}/v1  "
          f"models: {', '.join(server.registry.current.models())}"
          f"  (batch {cfg.max_batch}, {cfg.batching}{', watching the manifest' if cfg.watch else ''}"
          f"{', admin endpoints on' if cfg.admin_token else ''})", flush=True)
    uvicorn.run(create_app(server), host=cfg.host, port=cfg.port, log_level=log.log_level,
                timeout_graceful_shutdown=30)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model store over an OpenAI-compatible HTTP API (routing, mixed batches, hot add)",
        description="OpenAI-compatible server for a crma model store: /v1/completions, /v1/chat/completions "
                    "(streaming), /v1/models (every domain, auto, base), /health; POST /admin/reload with "
                    "--admin-token. Requests are batched across adapters and backbone versions.")
    add_options(p, ServeConfig)
    add_options(p, LogArgs)
    add_sections(p, ("device",), hidden=("gradient_checkpointing", "fsdp"))
    p.set_defaults(func=cmd_serve)
