"""`crma serve`: the OpenAI-compatible server for a model store.

    crma serve --store DIR [--host 127.0.0.1] [--port 8000] [--admin-token-file FILE] [--max-batch N] [--watch]

The admin token comes from --admin-token-file or $CRMA_ADMIN_TOKEN; --admin-token still works, with a
warning: every local user can read a command line in the process list.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

from ..serve.config import LOOPBACK_NAMES, ServeConfig
from .options import add_options, build, opt
from .settings import add_sections, sections


@dataclass
class LogArgs:
    log_level: str = opt("info", choices=("debug", "info", "warning", "error"))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn  # heavy (the web stack, 0.5 s to import): only for crma serve

    from ..serve.app import uvicorn_config  # heavy, as above (FastAPI)
    from ..serve.server import Server  # heavy, as above

    log = build(args, LogArgs)
    logging.basicConfig(level=getattr(logging, log.log_level.upper()),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = admin_token(build(args, ServeConfig, device=sections(args, ("device",))["device"]))
    for warning in transport_warnings(cfg):
        print(f"crma serve: warning: {warning}", file=sys.stderr, flush=True)
    server = Server.open(cfg)
    for warning in access_warnings(cfg, len(server.keys)):
        print(f"crma serve: {warning}", file=sys.stderr, flush=True)
    print(f"crma serve: {cfg.store} on http://{cfg.host}:{cfg.port}/v1  "
          f"models: {', '.join(server.registry.current.models())}"
          f"  (batch {cfg.max_batch}, {cfg.batching}{', watching the manifest' if cfg.watch else ''}"
          f"{', admin endpoints on' if cfg.admin_token else ''})", flush=True)
    if cfg.ui:
        print(f"crma serve: web console on http://{cfg.host}:{cfg.port}/ui/", flush=True)
    uv = uvicorn.Server(uvicorn_config(server, log_level=log.log_level, timeout_graceful_shutdown=30))
    try:
        uv.run()
    except KeyboardInterrupt:
        pass
    return 0 if uv.started else 1                    # e.g. the port is taken (uvicorn logged why)


def transport_warnings(cfg: ServeConfig) -> list[str]:
    """What in the settings will surprise: a wildcard address with only loopback Host names allowed, a
    connection cap the process's file limit cannot hold."""
    out = []
    if cfg.host in ("0.0.0.0", "::") and not cfg.allowed_hosts:
        out.append(f"listening on {cfg.host}, but only requests naming localhost, 127.0.0.1 or ::1 in their Host "
                   "header are served: add the names clients use with --allowed-hosts")
    try:
        import resource  # optional: POSIX only
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]          # RLIM_INFINITY is -1
    except (ImportError, OSError, ValueError):
        soft = -1
    if 0 < soft < cfg.max_connections + 64:
        out.append(f"--max-connections {cfg.max_connections} is close to this process's file limit ({soft}, "
                   "`ulimit -n`): lower it, or raise the limit")
    return out


def access_warnings(cfg: ServeConfig, keys: int) -> list[str]:
    """Who can use /v1: with keys, only their holders; without, whoever reaches the address (loopback: this
    machine's users; any other address: a warning)."""
    if keys:
        return [f"{keys} API key(s): /v1 and /metrics need one"]
    if cfg.host in LOOPBACK_NAMES:
        return [f"no API keys: /v1 is open to every user of this machine (listening on {cfg.host} only; add "
                "--api-key-file FILE before listening on another address)"]
    return [f"warning: no API keys and listening on {cfg.host}: anyone who can reach this address can use every "
            "domain; give keys with --api-key-file FILE or $CRMA_API_KEY"]


def admin_token(cfg: ServeConfig, environ=os.environ) -> ServeConfig:
    """The admin token: --admin-token-file (read by ServeConfig), else --admin-token (with a warning: the
    process list shows it to every local user), else $CRMA_ADMIN_TOKEN."""
    if cfg.admin_token and cfg.admin_token_file is None:
        print("crma serve: warning: --admin-token is visible to every local user in the process list; use "
              "--admin-token-file FILE or $CRMA_ADMIN_TOKEN instead", file=sys.stderr, flush=True)
    elif not cfg.admin_token:
        cfg.admin_token = environ.get("CRMA_ADMIN_TOKEN") or None
    return cfg


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model store over an OpenAI-compatible HTTP API (routing, mixed batches, hot add)",
        description="OpenAI-compatible server for a crma model store: /v1/completions, /v1/chat/completions "
                    "(streaming), /v1/models (every domain, auto, base), /health; POST /admin/reload with "
                    "an admin token (--admin-token-file or $CRMA_ADMIN_TOKEN). Requests are batched across "
                    "adapters and backbone versions. Only loopback Host names are served unless --allowed-hosts "
                    "names more.")
    add_options(p, ServeConfig)
    add_options(p, LogArgs)
    add_sections(p, ("device",), hidden=("gradient_checkpointing", "fsdp"))
    p.set_defaults(func=cmd_serve)
