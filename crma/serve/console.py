"""The web console (`/ui`): a page for people who would rather look than read, served by crma itself.

    GET  /ui/                    the page (crma/serve/ui/: plain HTML, CSS and JavaScript, nothing fetched
                                 from elsewhere, no build step); it holds no data
    GET  /ui/api/store           the store (crma/store/summary.py) as served now, with what is unavailable
    GET  /ui/api/live            the /metrics counters as one dictionary, the snapshot serial and the models
    POST /ui/api/route           {"text"}: every domain's router probability, the background class, the
                                 decision and why (the model's thread computes the features)
    GET  /ui/api/route-log?n=N   the last N lines of the routing log (--route-log), newest first
    GET  /ui/api/results         the benchmark report of --results DIR as HTML, its plots inline

The page talks to the same server: chat through /v1/chat/completions (streamed), store changes through
/admin/rollback and /admin/remove (only with the admin token, which the page asks for in a confirmation
dialog and never stores). When API keys are set every /ui/api call needs one, sent the way /v1 wants it
(`Authorization: Bearer KEY`; the page asks for the key and keeps it in the tab's sessionStorage), and a
key limited to some domains sees only those; the admin token is accepted wherever a key is.
"""
from __future__ import annotations

import base64
import json
import mimetypes
from collections import deque
from functools import lru_cache
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, RedirectResponse
from markdown_it import MarkdownIt
from starlette.concurrency import run_in_threadpool

from ..routing import BASE, explain_text
from ..store.summary import describe
from ..store.verify import Damage
from .auth import ApiKey, authorize, check_token
from .protocol import APIError
from .registry import AUTO, Snapshot
from .route_log import log_files
from .server import Server

UI_DIR = Path(__file__).parent / "ui"
STATIC = {**{f"{name}.js": "text/javascript" for name in ("console", "util", "store", "chat", "router", "live")},
          "console.css": "text/css"}
MAX_ROUTE_TEXT = 20_000
IMAGES = (".png", ".svg", ".jpg", ".jpeg")


def add_console(app: FastAPI, server: Server, read_json) -> None:
    """Register the console's routes on `app` (read_json: the app's body reader, with its limits)."""
    cfg = server.cfg
    cache: dict = {}

    def caller(request: Request) -> ApiKey | None:
        auth = request.headers.get("authorization")
        if cfg.admin_token and check_token(cfg.admin_token, auth):
            return None                                     # the operator sees everything
        return authorize(server.keys, auth)

    @app.get("/ui", include_in_schema=False)
    async def ui_root():
        return RedirectResponse("/ui/", status_code=307)

    @app.get("/ui/", include_in_schema=False)
    async def ui_page():
        return FileResponse(UI_DIR / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache", "Content-Security-Policy": CSP})

    @app.get("/ui/static/{name}", include_in_schema=False)
    async def ui_static(name: str):
        if name not in STATIC:
            raise APIError(404, f"no console file {name!r}", code="not_found")
        return FileResponse(UI_DIR / name, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    @app.get("/ui/api/store")
    async def ui_store(request: Request):
        key = caller(request)
        snap = server.registry.current
        if cache.get("serial") != snap.serial:
            cache.update(serial=snap.serial, store=await run_in_threadpool(describe, snap.store, served_damage(snap)))
        return {"store": restrict(cache["store"], key), "serving": serving(snap, key),
                "admin": bool(cfg.admin_token), "results": cfg.results is not None,
                "route_log": cfg.route_log is not None}

    @app.get("/ui/api/live")
    async def ui_live(request: Request):
        key = caller(request)
        snap = server.registry.current
        return {"metrics": server.telemetry.snapshot(), **server.scheduler.load(), "serving": serving(snap, key),
                "last_reload": {k: v for k, v in (server.last_reload or {}).items() if k != "error"} or None}

    @app.post("/ui/api/route")
    async def ui_route(request: Request):
        key = caller(request)
        body = await read_json(request, cfg.max_body_bytes, cfg.timeout_body)
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise APIError(400, "send {\"text\": \"...\"}: the text to route", param="text", code="invalid_value")
        if len(text) > MAX_ROUTE_TEXT:
            raise APIError(400, f"the text is longer than {MAX_ROUTE_TEXT} characters", param="text",
                           code="invalid_value")
        snap = server.registry.acquire()
        try:
            router = snap.router_for(None if key is None else key.domains)
            if router is None or AUTO in snap.unavailable:
                raise APIError(409, "this store has no router that can be used (see /ui/api/store)",
                               code="no_router")
            live = server.live
            fut = server.scheduler.call(lambda: explain_text(router, live.model, live.tokenizer, text))
            out = await run_in_threadpool(fut.result, 120)
        finally:
            server.registry.release(snap)
        return {**out, "router_version": snap.store.manifest["router"]["current"]}

    @app.get("/ui/api/route-log")
    async def ui_route_log(request: Request, n: int = 50):
        key = caller(request)
        if cfg.route_log is None:
            return {"enabled": False, "records": []}
        n = max(1, min(n, 500))
        rows = await run_in_threadpool(tail_records, cfg.route_log, n)
        if key is not None and key.domains is not None:
            rows = [r for r in rows if r.get("key") == key.id]
        return {"enabled": True, "records": rows}

    @app.get("/ui/api/results")
    async def ui_results(request: Request):
        caller(request)
        if cfg.results is None:
            raise APIError(404, "no results folder: start crma serve with --results DIR", code="no_results")
        html = await run_in_threadpool(report_html, cfg.results, (cfg.results / "report.md").stat().st_mtime)
        return {"html": html, "folder": cfg.results.name}


CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def served_damage(snap: Snapshot) -> Damage:
    """What the served snapshot left out, in damaged_parts' shape (no file is hashed again)."""
    bad = snap.unavailable
    return Damage(router=bad.get(AUTO), backbone=bad.get(BASE),
                  domains={k: v for k, v in bad.items() if k not in (AUTO, BASE) and "@" not in k})


def serving(snap: Snapshot, key: ApiKey | None) -> dict:
    """What the server answers for right now: models (those `key` may use), the snapshot, unavailable parts."""
    allowed = [m for m in snap.models() if key is None or key.allows(m, (AUTO, BASE))]
    return {"models": allowed, "snapshot": snap.serial, "manifest_updated": snap.updated,
            "unavailable": sorted(m for m in snap.unavailable if key is None or key.allows(m, (AUTO, BASE))),
            "routes": {m: {"domain": r.domain, "adapter_version": r.adapter_version,
                           "backbone_version": r.backbone_version} for m, r in snap.routes.items() if m in allowed}}


def restrict(store: dict, key: ApiKey | None) -> dict:
    """The store as a key limited to some domains may see it: only its domains."""
    if key is None or key.domains is None:
        return store
    return {**store, "domains": [d for d in store["domains"] if d["name"] in key.domains],
            "log": [e for e in store["log"] if e.get("domain") in key.domains or "domain" not in e]}


def tail_records(path: Path, n: int) -> list[dict]:
    """The last `n` JSON lines of the routing log, newest first: the newest file, then rotated ones only
    while fewer than `n` were found; lines that are not JSON objects are skipped (a line being written,
    a damaged file)."""
    out: list[dict] = []
    for file in reversed(log_files(path)):
        rows: deque = deque(maxlen=n - len(out))
        with open(file, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
        out.extend(reversed(rows))
        if len(out) >= n:
            break
    return out


@lru_cache(maxsize=4)
def report_html(folder: Path, mtime: float) -> str:
    """report.md of a results folder as HTML (markdown-it, raw HTML off), its images inlined as data URIs."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    default_image = md.renderer.rules.get("image")

    def image(renderer, tokens, idx, options, env):
        token = tokens[idx]
        src = token.attrGet("src") or ""
        file = folder / src
        if "/" in src or "\\" in src or file.suffix.lower() not in IMAGES or not file.is_file():
            token.attrSet("src", "")
        else:
            kind = mimetypes.guess_type(file.name)[0] or "image/png"
            token.attrSet("src", f"data:{kind};base64,{base64.b64encode(file.read_bytes()).decode()}")
        return default_image(tokens, idx, options, env)

    md.add_render_rule("image", image)
    return md.render((folder / "report.md").read_text(encoding="utf-8"))
