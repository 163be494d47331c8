"""The HTTP API (FastAPI): OpenAI-compatible completions, chat, models, plus health and admin.

    POST /v1/completions, /v1/chat/completions   (stream: true -> server-sent events, then [DONE])
    GET  /v1/models, /v1/models/{id}, /health
    POST /admin/reload                           only with an admin token (Bearer), else absent

Every failure is an OpenAI-style error object with a 4xx status (a full queue: 503 + Retry-After);
the handlers only validate, tokenise and wait: the model runs in the scheduler's thread.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..engine.generate import encode_prompt
from ..routing import BASE
from ..store import StoreError
from .decoding import SamplingParams
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    chat_body,
    chat_chunk,
    completion_body,
    error_body,
    new_id,
    parse,
    usage,
    usage_chunk,
)
from .registry import AUTO
from .scheduler import QueueFull
from .scheduler import Request as Job
from .server import Server

log = logging.getLogger("crma.serve")


def create_app(server: Server, manage: bool = True) -> FastAPI:
    """The ASGI app for `server`; with `manage`, its lifespan starts and stops the server."""

    @asynccontextmanager
    async def lifespan(app):
        if manage:
            server.start()
        try:
            yield
        finally:
            if manage:
                await run_in_threadpool(server.stop)

    app = FastAPI(title="crma serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    cfg = server.cfg

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, err):                     # never a bare 500 page or a dead server
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {err}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return server.health()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(server, m) for m in server.registry.current.models()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name not in server.registry.current.models():
            raise _unknown_model(server, name)
        return _model_card(server, name)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await read_json(request, cfg.max_body_bytes))
        ids, text = _completion_prompt(server, req.prompt)
        return await _serve(server, request, req, ids, text, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse(ChatRequest, await read_json(request, cfg.max_body_bytes))
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            ids = encode_prompt(server.tokenizer, "", raw=False, messages=msgs)[0].tolist()
        except Exception as err:                           # e.g. a chat template that wants alternating roles
            raise APIError(400, f"the messages do not fit this model's chat template: {err}", param="messages",
                           code="invalid_value") from None
        users = [m["content"] for m in msgs if m["role"] == "user"]
        return await _serve(server, request, req, ids, users[-1] if users else msgs[-1]["content"], chat=True)

    if cfg.admin_token:
        @app.post("/admin/reload")
        async def reload(request: Request):
            _check_token(request, cfg.admin_token)
            try:
                return await run_in_threadpool(server.reload)
            except StoreError as err:
                raise APIError(409, f"store refused, still serving the previous manifest: {err}",
                               "store_error", code="store_verification_failed") from None

    return app


async def read_json(request: Request, limit: int):
    """The body as JSON, at most `limit` bytes (413 beyond, whatever Content-Length says)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                       code="body_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the request") from None
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as err:              # bad UTF-8, bad JSON, absurd nesting
        raise APIError(400, f"We could not parse the JSON body of your request ({err})", code="invalid_json") from None


def _check_token(request: Request, token: str) -> None:
    got = request.headers.get("authorization", "")
    scheme, _, value = got.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip().encode(), token.encode()):
        raise APIError(401, "admin endpoints need 'Authorization: Bearer <admin token>'", "authentication_error",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _unknown_model(server: Server, name: str) -> APIError:
    why = server.registry.current.unavailable.get(name)
    if why is not None:                          # a damaged file: the rest of the store serves
        return APIError(503, f"The model '{name}' is unavailable: a file it needs is damaged or missing; the "
                             "store's operator can run `crma store verify --repair`", "server_error",
                        param="model", code="model_unavailable")
    return APIError(404, f"The model '{name}' does not exist; this store serves: "
                         f"{', '.join(server.registry.current.models())}", param="model", code="model_not_found")


def _model_card(server: Server, name: str) -> dict:
    snap = server.registry.current
    route = snap.routes.get(name)
    extra = {"adapter_version": route.adapter_version, "backbone_version": route.backbone_version} if route else {}
    return {"id": name, "object": "model", "created": int(snap.loaded_at), "owned_by": "crma",
            "crma": {"kind": "router" if name == AUTO else "base" if name == BASE else "domain", **extra}}


def _completion_prompt(server: Server, prompt) -> tuple[list[int], str]:
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        vocab = server.live.model.config.vocab_size
        if any(not 0 <= p < vocab for p in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
        return list(prompt), server.tokenizer.decode(prompt)
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "send one prompt per request (a list of several prompts is not supported)",
                           param="prompt", code="unsupported_parameter")
        prompt = prompt[0]
    return server.tokenizer(prompt)["input_ids"], prompt


async def _serve(server: Server, request: Request, req, ids: list[int], route_text: str, chat: bool):
    snap = server.registry.acquire()            # bound to the manifest current now, to its end
    try:
        job = _job(server, snap, req, ids, route_text, chat)
        server.scheduler.submit(job)
    except QueueFull as err:
        server.registry.release(snap)
        raise APIError(503, f"the server is busy ({err}); retry shortly", "server_busy", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    except BaseException:
        server.registry.release(snap)
        raise
    rid = new_id("chatcmpl" if chat else "cmpl")
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventSourceResponse(_stream(job, rid, req.model, chat, include_usage), ping=15, sep="\n")
    return await _collect(job, request, rid, req.model, chat)


def _job(server: Server, snap, req, ids: list[int], route_text: str, chat: bool) -> Job:
    """Check the request against the snapshot and the limits; the scheduler's job for it."""
    cfg = server.cfg
    if req.model not in snap.models():
        raise _unknown_model(server, req.model)
    max_tokens = req.max_tokens or (cfg.default_max_tokens if chat else 16)
    if max_tokens > cfg.max_tokens:
        raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of {cfg.max_tokens}",
                       param="max_tokens", code="invalid_value")
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
    if len(ids) > cfg.max_prompt_tokens or len(ids) + max_tokens > server.max_positions:
        raise APIError(400, f"the prompt has {len(ids)} tokens; the limit is {cfg.max_prompt_tokens} prompt tokens "
                            f"and {server.max_positions} tokens with max_tokens", param="prompt",
                       code="context_length_exceeded")
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                            top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=tuple(req.stop or ()))
    return Job(ids, params, req.model, snap, route_text, asyncio.get_running_loop(), asyncio.Queue())


async def _events(job: Job):
    """The job's events until it ends; cancels the job if the consumer goes away first."""
    done = False
    try:
        while True:
            kind, data = await job.queue.get()
            done = kind in ("done", "error")
            yield kind, data
            if done:
                return
    finally:
        if not done:
            job.cancelled = True


async def _collect(job: Job, request: Request, rid: str, model: str, chat: bool):
    """Wait for the whole completion, watching for a client that disconnects meanwhile."""
    text, info, finished, checked = [], None, False, time.monotonic()
    try:
        while True:
            get = asyncio.ensure_future(job.queue.get())
            while not get.done():
                await asyncio.wait({get}, timeout=0.1)
                if time.monotonic() - checked >= 0.1:      # events may keep coming: check by the clock
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        get.cancel()
                        return JSONResponse(error_body("client disconnected"), status_code=499)
            kind, data = get.result()
            if kind == "route":
                info = data["info"]
            elif kind == "text":
                text.append(data["text"])
            elif kind == "error":
                finished = True
                raise APIError(500, data["message"], "server_error")
            else:
                finished = True
                use = usage(data["prompt_tokens"], data["completion_tokens"])
                build = chat_body if chat else completion_body
                return build(rid, model, "".join(text), data["finish_reason"], info, use)
    finally:
        if not finished:
            job.cancelled = True


async def _stream(job: Job, rid: str, model: str, chat: bool, include_usage: bool):
    """Server-sent events: one chunk per released piece of text, a last chunk with the finish
    reason (and usage, if asked), then `data: [DONE]`."""
    info = None
    async for kind, data in _events(job):
        if kind == "route":
            info = data["info"]
            if chat:
                yield {"data": json.dumps(chat_chunk(rid, model, {"role": "assistant", "content": ""}, None, info))}
        elif kind == "text":
            body = chat_chunk(rid, model, {"content": data["text"]}, None, info) if chat else \
                completion_body(rid, model, data["text"], None, info, None)
            yield {"data": json.dumps(body)}
        elif kind == "error":
            yield {"data": json.dumps(error_body(data["message"], "server_error"))}
            return
        else:
            finish = data["finish_reason"]
            body = (chat_chunk(rid, model, {}, finish, info) if chat
                    else completion_body(rid, model, "", finish, info, None))
            yield {"data": json.dumps(body)}
            if include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield {"data": json.dumps(usage_chunk(rid, model, obj, usage(data["prompt_tokens"],
                                                                              data["completion_tokens"])))}
            yield {"data": "[DONE]"}
            return
