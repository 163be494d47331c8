"""The HTTP API (FastAPI): OpenAI-compatible completions, chat, models, plus health and admin.

    POST /v1/completions, /v1/chat/completions   (stream: true -> server-sent events, then [DONE])
    GET  /v1/models, /v1/models/{id}, /health
    GET  /metrics                                Prometheus (crma/serve/telemetry.py)
    POST /admin/reload                           only with an admin token (Bearer), else absent
    POST /admin/rollback {"domain", "to"?}       the same: `crma store rollback|remove` on the served store,
    POST /admin/remove {"domain"}                then a reload
    GET  /ui/, /ui/api/...                       the web console (crma/serve/console.py; --no-ui: absent)

With API keys (crma/serve/auth.py) every /v1 request needs one (401), and a key limited to some domains
gets 403 for another domain and sees only its own in /v1/models; /metrics needs a key or --metrics-token.

Every failure a request causes is an OpenAI-style error object with a 4xx status (a full queue: 503 +
Retry-After; 5xx only for the server's own faults, which the `openai` client retries); the handlers only
validate, tokenise (in a worker thread, never on the event loop) and wait: the model runs in the
scheduler's thread.

A loopback server must not be drivable by a web page (DNS rebinding, cross-site requests): the `Host`
header must name an allowed host (loopback names, --host, --allowed-hosts: else 400), a browser's
`Origin` must too (else 403), and a POST body must be `application/json` (else 415), which a page can
send only after a CORS preflight this server never grants. `/health` shows file and store paths only
with the admin token. `uvicorn_config` adds the transport's limits: a deadline for a request's line and
headers and for its body, an idle timeout between requests and a cap on open connections.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..data import prompt_ids
from ..routing import BASE
from ..store import StoreError
from .auth import ApiKey, authorize, check_model, check_token, match
from .completions import completion_prompts, serve, unknown_model
from .config import ServeConfig
from .console import add_console
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    error_body,
    parse,
)
from .registry import AUTO
from .server import Server
from .telemetry import CONTENT_TYPE

log = logging.getLogger("crma.serve")


def create_app(server: Server, manage: bool = True) -> FastAPI:
    """The ASGI app for `server`; with `manage`, its lifespan starts and stops the server."""

    @asynccontextmanager
    async def lifespan(app):
        if manage:                      # listening once the model is ready (its kernels compiled)
            await run_in_threadpool(server.start)
        try:
            yield
        finally:
            if manage:
                await run_in_threadpool(server.stop)

    app = FastAPI(title="crma serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    cfg = server.cfg
    hosts = cfg.host_names()
    app.add_middleware(OriginGuard, hosts=hosts)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(hosts), www_redirect=False)   # outermost
    tokenizer_lock = threading.Lock()           # one tokenizer for the HTTP side, used from worker threads

    def tokenize(fn, *args):
        with tokenizer_lock:
            return fn(*args)

    def token_text(token: int) -> str:            # one token's text, for log-probabilities
        with tokenizer_lock:
            return server.tokenizer.decode([token])

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        if request.url.path.startswith("/v1/") and request.method == "POST":
            server.telemetry.refused(getattr(request.state, "model", "-"), err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    def caller(request: Request) -> ApiKey | None:
        return authorize(server.keys, request.headers.get("authorization"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, err):                     # never a bare 500 page or a dead server
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {err}", "server_error"), status_code=500)

    @app.get("/health")
    async def health(request: Request):
        full = server.health()
        if request.headers.get("authorization") is not None and cfg.admin_token:
            _check_token(request, cfg.admin_token)
            return full
        return public_health(full)

    @app.get("/metrics")
    async def metrics(request: Request):
        auth = request.headers.get("authorization")
        if (cfg.metrics_token or server.keys) and not (cfg.metrics_token and check_token(cfg.metrics_token, auth)):
            if match(server.keys, auth) is None:
                raise APIError(401, "/metrics needs 'Authorization: Bearer <API key or --metrics-token>'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return Response(server.telemetry.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        key = caller(request)
        return {"object": "list", "data": [_model_card(server, m) for m in server.registry.current.models()
                                           if key is None or key.allows(m, (AUTO, BASE))]}

    @app.get("/v1/models/{name}")
    async def model(name: str, request: Request):
        key = caller(request)
        if name not in server.registry.current.models():
            raise unknown_model(server, name)
        check_model(key, name, (AUTO, BASE))
        return _model_card(server, name)

    @app.post("/v1/completions")
    async def completions(request: Request):
        key = caller(request)
        req = parse(CompletionRequest, await read_json(request, cfg.max_body_bytes, cfg.timeout_body))
        request.state.model = req.model
        check_model(key, req.model, (AUTO, BASE))
        prompts = await run_in_threadpool(tokenize, completion_prompts, server, req.prompt)
        return await serve(server, request, req, prompts, None, chat=False, token_text=token_text, key=key)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        key = caller(request)
        req = parse(ChatRequest, await read_json(request, cfg.max_body_bytes, cfg.timeout_body))
        request.state.model = req.model
        check_model(key, req.model, (AUTO, BASE))
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            ids = await run_in_threadpool(tokenize, prompt_ids, server.tokenizer, msgs)
        except Exception as err:                           # e.g. a chat template that wants alternating roles
            raise APIError(400, f"the messages do not fit this model's chat template: {err}", param="messages",
                           code="invalid_value") from None
        users = [m["content"] for m in msgs if m["role"] == "user"]
        return await serve(server, request, req, [(ids, "")], users[-1] if users else msgs[-1]["content"],
                           chat=True, token_text=token_text, key=key)

    if cfg.admin_token:
        @app.post("/admin/reload")
        async def reload(request: Request):
            _check_token(request, cfg.admin_token)
            try:
                return await run_in_threadpool(server.reload)
            except StoreError as err:
                raise APIError(409, f"store refused, still serving the previous manifest: {err}",
                               "store_error", code="store_verification_failed") from None

        @app.post("/admin/{action}")
        async def change(action: str, request: Request):
            _check_token(request, cfg.admin_token)
            if action not in ("rollback", "remove"):
                raise APIError(404, f"no admin endpoint /admin/{action}", code="not_found")
            body = await read_json(request, cfg.max_body_bytes, cfg.timeout_body)
            domain = body.get("domain") if isinstance(body, dict) else None
            to = body.get("to") if isinstance(body, dict) else None
            if not isinstance(domain, str) or not domain:
                raise APIError(400, "send {\"domain\": NAME}", param="domain", code="invalid_value")
            if to is not None and not isinstance(to, int | str):
                raise APIError(400, "'to' is a version: 2 or \"v2\"", param="to", code="invalid_value")
            try:
                return await run_in_threadpool(server.change, action, domain, None if to is None else str(to))
            except StoreError as err:
                raise APIError(409, f"{action} refused, nothing changed: {err}", "store_error",
                               code="store_refused") from None

    if cfg.ui:
        add_console(app, server, read_json)

    return app


async def read_json(request: Request, limit: int, timeout: float = 30.0):
    """The body as JSON: at most `limit` bytes (413 beyond, whatever Content-Length says), all of it
    within `timeout` seconds (408 and the connection closed: a slow client holds nothing for long), sent
    as `application/json` (415: a web page can send a cross-origin POST without a preflight only as
    text/plain, a form or multipart)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                       code="body_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
                chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the request") from None
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise APIError(415, f"the request body must be sent as Content-Type: application/json (got "
                            f"{media or 'none'!r})", code="unsupported_media_type")
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as err:              # bad UTF-8, bad JSON, absurd nesting
        raise APIError(400, f"We could not parse the JSON body of your request ({err})", code="invalid_json") from None


PUBLIC_HEALTH = ("status", "models", "unavailable", "snapshot", "manifest_updated", "active", "queued",
                 "loaded_adapters", "held_snapshots", "stats", "last_reload", "uptime_s", "batching", "lora_mixing",
                 "max_batch", "watch")


def public_health(full: dict) -> dict:
    """/health for a caller without the admin token: no store path, no file path (the reasons a model is
    unavailable and a refused reload's error name files): the keys in PUBLIC_HEALTH, those redacted."""
    out = {k: full[k] for k in PUBLIC_HEALTH if k in full}
    if "unavailable" in out:
        why = "a file it needs is damaged or missing (details: the health check with the admin token)"
        out["unavailable"] = {name: why for name in full["unavailable"]}
    if isinstance(out.get("last_reload"), dict):
        out["last_reload"] = {k: v for k, v in out["last_reload"].items() if k != "error"}
    return out


class OriginGuard:
    """ASGI middleware: a request a browser sent from a page on another origin (its `Origin` header names
    a host not in `hosts`, or is `null`) gets 403 before it reaches a route."""

    def __init__(self, app, hosts: tuple[str, ...]):
        self.app, self.hosts = app, tuple(h.lower() for h in hosts)

    def allowed(self, origin: str) -> bool:
        if "*" in self.hosts:
            return True
        try:
            parts = urlsplit(origin.strip())
            host = parts.hostname
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not host:
            return False
        return any(host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in self.hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            origin = Headers(scope=scope).get("origin")
            if origin is not None and not self.allowed(origin):
                body = error_body(f"requests from the web origin {origin!r} are not allowed (this server accepts "
                                  "the origins of --allowed-hosts)", "permission_error", code="origin_not_allowed")
                await JSONResponse(body, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def uvicorn_config(server: Server, app=None, **options) -> uvicorn.Config:
    """uvicorn's settings for `server`: its address and the transport limits of its ServeConfig (other
    uvicorn options, e.g. log_level, as keywords)."""
    cfg = server.cfg
    return uvicorn.Config(app if app is not None else create_app(server), host=cfg.host, port=cfg.port,
                          http=protocol(cfg), timeout_keep_alive=cfg.timeout_keep_alive,
                          limit_concurrency=cfg.max_connections + 1, h11_max_incomplete_event_size=cfg.max_header_bytes,
                          **options)


def _raw_response(status: str, message: str, code: str, extra: bytes = b"") -> bytes:
    body = json.dumps(error_body(message, "server_busy" if status.startswith("503") else "invalid_request_error",
                                 code=code)).encode()
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n%s"
            % (status.encode(), len(body), extra, body))


def protocol(cfg: ServeConfig) -> type[H11Protocol]:
    """uvicorn's h11 protocol with what it lacks: a deadline for each request's line and headers (its
    keep-alive timer only runs between requests, so a client that sends half a request, or nothing,
    would hold its connection forever) and a cap on open connections (beyond it: 503 and closed)."""

    class Protocol(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > cfg.max_connections:
                log.warning("%d open connections (limit %d): refusing one", len(self.connections) - 1,
                            cfg.max_connections)
                transport.write(_raw_response("503 Service Unavailable", "too many open connections; retry shortly",
                                              "too_many_connections", b"retry-after: 1\r\n"))
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and self.conn.their_state is h11.IDLE:
                self._arm()                          # the next request's head starts: its own deadline
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()                       # its line and headers are in

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            self._disarm()                           # idle until the next request: uvicorn's keep-alive timer
            super().on_response_complete()

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(cfg.timeout_headers, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            if self.conn.our_state is h11.IDLE and self.conn.trailing_data[0]:     # half a request: say why
                self.transport.write(_raw_response("408 Request Timeout", "the request line and headers did not "
                                                   f"arrive within {cfg.timeout_headers:g} s", "request_timeout"))
            self.transport.close()

    return Protocol


def _check_token(request: Request, token: str) -> None:
    if not check_token(token, request.headers.get("authorization")):
        raise APIError(401, "admin endpoints need 'Authorization: Bearer <admin token>'", "authentication_error",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _model_card(server: Server, name: str) -> dict:
    snap = server.registry.current
    route = snap.routes.get(name)
    extra = {"adapter_version": route.adapter_version, "backbone_version": route.backbone_version} if route else {}
    return {"id": name, "object": "model", "created": int(snap.loaded_at), "owned_by": "crma",
            "crma": {"kind": "router" if name == AUTO else "base" if name == BASE else "domain", **extra}}
