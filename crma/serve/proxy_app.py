"""The route proxy's HTTP side (FastAPI + httpx): the OpenAI API, forwarded to the upstream.

    POST /v1/completions, /v1/chat/completions   routed (`auto`) or passed on; streamed answers passed through
                                                 chunk by chunk, each with the `crma` object
    GET  /v1/models, /health

The request body goes upstream as the client sent it, with only `model` changed (auto -> the domain the
router chose). The upstream's status and error bodies come back unchanged; an upstream that cannot be
reached is a 502 with an OpenAI error object. Only loopback Host names and the --host are accepted (a web
page cannot drive the proxy through DNS rebinding).
"""
from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from .auth import authorize, check_model
from .config import LOOPBACK_NAMES
from .protocol import APIError, error_body
from .proxy import AUTO, Proxy

log = logging.getLogger("crma.serve.proxy")
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}


def route_texts_of(path: str, body: dict) -> list[str] | None:
    """What `auto` routes on, as crma serve does: a chat's last user message (else its last message);
    each text prompt of a completion. None for token-id prompts (no tokenizer here to read them)."""
    if path.endswith("chat/completions"):
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise APIError(400, "'messages' must be a non-empty list of messages", param="messages")
        users = [m for m in msgs if m.get("role") == "user"]
        content = (users[-1] if users else msgs[-1]).get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return [content if isinstance(content, str) else ""]
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    if isinstance(prompt, list) and prompt:
        return None
    raise APIError(400, "'prompt' must be a string, a list of strings or token ids", param="prompt")


def with_info(body, info: dict):
    """The upstream's JSON body with the `crma` object added (also to each choice of several prompts)."""
    if isinstance(body, dict) and "error" not in body:
        body["crma"] = info
        choices = body.get("choices")
        if isinstance(choices, list) and len(choices) > 1:
            for choice in choices:
                if isinstance(choice, dict):
                    choice["crma"] = info
    return body


def create_proxy_app(proxy: Proxy, transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    cfg = proxy.cfg
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        timeout = httpx.Timeout(cfg.timeout, connect=min(cfg.timeout, 10.0))
        async with httpx.AsyncClient(timeout=timeout, transport=transport) as client:
            state["client"] = client
            yield

    app = FastAPI(title="crma route-proxy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=sorted({*LOOPBACK_NAMES, cfg.host}), www_redirect=False)

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.get("/health")
    async def health():
        """200 when the upstream answers GET /health at its root (vLLM's) within 5 s, else 503: a load balancer
        in front of several proxies then sends nothing to one whose engine is still loading or gone."""
        routes = proxy.current()
        try:
            got = await state["client"].get(cfg.upstream.removesuffix("/v1") + "/health", timeout=5.0)
            upstream = "ok" if got.status_code == 200 else f"HTTP {got.status_code}"
        except httpx.HTTPError as err:
            upstream = f"unreachable ({type(err).__name__})"
        body = {"status": "ok" if upstream == "ok" else "upstream_unavailable", "upstream": cfg.upstream,
                "upstream_health": upstream, "models": routes.models(), "manifest_updated": routes.updated,
                "export_manifest_updated": routes.export_manifest,
                "router_domains": list(routes.router.names) if routes.router is not None else [],
                "reload_error": proxy.reload_error}
        return JSONResponse(body, status_code=200 if upstream == "ok" else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        key = authorize(proxy.keys, request.headers.get("authorization"))
        routes = proxy.current()
        return {"object": "list", "data": [
            {"id": m, "object": "model", "owned_by": "crma", "crma": {
                "kind": "router" if m == AUTO else "base" if m == "base" else "domain",
                **({} if m == AUTO else {"upstream_model": routes.targets[m].upstream})}}
            for m in routes.models() if key is None or key.allows(m, (AUTO, "base"))]}

    async def forward(request: Request, path: str):
        key = authorize(proxy.keys, request.headers.get("authorization"))
        raw = await request.body()
        if len(raw) > cfg.max_body_bytes:
            raise APIError(413, f"request body exceeds the limit of {cfg.max_body_bytes} bytes", code="body_too_large")
        try:
            body = json.loads(raw)
        except ValueError as err:
            raise APIError(400, f"We could not parse the JSON body of your request ({err})",
                           code="invalid_json") from None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise APIError(400, "the request needs a 'model'", param="model")
        model = body["model"]
        check_model(key, model, (AUTO, "base"))
        routes = await run_in_threadpool(proxy.current)
        texts = route_texts_of(path, body) if model == AUTO else None
        upstream_model, info = await run_in_threadpool(routes.decide, model, texts, key)
        body["model"] = upstream_model
        headers = {"content-type": "application/json"}
        auth = f"Bearer {proxy.upstream_key}" if proxy.upstream_key else \
            (request.headers.get("authorization") if not proxy.keys else None)
        if auth:
            headers["authorization"] = auth
        client: httpx.AsyncClient = state["client"]
        upstream = client.build_request("POST", f"{cfg.upstream}/{path}", json=body, headers=headers)
        try:
            response = await client.send(upstream, stream=True)
        except httpx.HTTPError as err:
            raise APIError(502, f"the upstream {cfg.upstream} could not be reached: {type(err).__name__}: {err}",
                           "server_error", code="upstream_unreachable") from None
        crma_headers = {"X-Crma-Domain": info["domain"], "X-Crma-Upstream-Model": upstream_model}
        if not body.get("stream") or response.status_code != 200 or \
                not response.headers.get("content-type", "").startswith("text/event-stream"):
            try:
                content = await response.aread()
            finally:
                await response.aclose()
            try:
                payload = with_info(json.loads(content), info)
            except ValueError:
                return Response(content, status_code=response.status_code, headers=crma_headers,
                                media_type=response.headers.get("content-type"))
            return JSONResponse(payload, status_code=response.status_code, headers=crma_headers)
        return StreamingResponse(_relay(response, info), status_code=200, media_type="text/event-stream",
                                 headers={**crma_headers, "Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await forward(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await forward(request, "chat/completions")

    return app


async def _relay(response: httpx.Response, info: dict):
    """The upstream's server-sent events, line by line, each `data:` JSON chunk with the `crma` object."""
    try:
        async for line in response.aiter_lines():
            if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
                try:
                    chunk = json.loads(line[5:])
                    line = "data: " + json.dumps(with_info(chunk, info), separators=(",", ":"))
                except ValueError:
                    pass
            yield line + "\n"
    except httpx.HTTPError as err:                  # the upstream broke off: an error event, then the end
        log.warning("upstream stream broke off: %s", err)
        yield "data: " + json.dumps(error_body(f"the upstream stream broke off: {err}", "server_error")) + "\n\n"
    finally:
        await response.aclose()
