"""`crma route-proxy`: crma's router in front of another OpenAI-compatible server (vLLM serving a crma export).

    crma route-proxy --store DIR --upstream http://127.0.0.1:8001 [--export DIR2] [--port 8100]

`auto` requests are routed with the store's router and forwarded with `model` set to the chosen domain;
every answer carries the `crma` object crma serve returns (docs/vllm.md).
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..serve.auth import load_keys
from ..serve.proxy import Proxy, ProxyConfig
from .options import add_options, build
from .serve import LogArgs


def cmd_proxy(args: argparse.Namespace) -> int:
    import uvicorn  # heavy (the web stack): only for the proxy

    from ..serve.proxy_app import create_proxy_app  # heavy, as above (FastAPI, httpx)

    log = build(args, LogArgs)
    logging.basicConfig(level=getattr(logging, log.log_level.upper()),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = build(args, ProxyConfig)
    proxy = Proxy(cfg, load_keys([], cfg.api_key_file))
    routes = proxy.routes
    encoder = routes.router.cfg.encoder if routes.router is not None else "none (every auto request goes to base)"
    print(f"crma route-proxy: {cfg.store} -> {cfg.upstream} on http://{cfg.host}:{cfg.port}/v1  models: "
          f"{', '.join(routes.models())}  (router encoder: {encoder}"
          f"{'; the base model is loaded for it' if routes.encoder[0] is not None else ''})", flush=True)
    if not proxy.keys:
        print("crma route-proxy: no API keys: /v1 is open to whoever reaches the address", file=sys.stderr)
    uv = uvicorn.Server(uvicorn.Config(create_proxy_app(proxy), host=cfg.host, port=cfg.port,
                                       log_level=log.log_level))
    try:
        uv.run()
    except KeyboardInterrupt:
        pass
    return 0 if uv.started else 1


def register(sub) -> None:
    p = sub.add_parser("route-proxy", help="crma's router in front of vLLM (or any OpenAI-compatible server)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, ProxyConfig)
    add_options(p, LogArgs)
    p.set_defaults(func=cmd_proxy)
