"""Running one API request: check it, hand it to the scheduler, and shape what comes back.

    /v1/completions       one prompt, or a list of prompts (one choice each, not streamed), as text or
                          token ids; `echo` puts the prompt in the text and, with `logprobs`, its tokens'
                          log-probabilities (max_tokens 0: the prompt scored, nothing generated)
    /v1/chat/completions  `logprobs` and `top_logprobs`

Log-probabilities are those of the model's own distribution (raw scores, before temperature or top-p),
in OpenAI's shapes: the legacy `{tokens, token_logprobs, top_logprobs, text_offset}` for completions and
`{content: [{token, logprob, bytes, top_logprobs}]}` for chat, streamed with the text they belong to.
"""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from ..data import text_ids
from .auth import ApiKey
from .decoding import SamplingParams
from .protocol import (
    IGNORED_HEADER,
    APIError,
    chat_body,
    chat_chunk,
    chat_logprobs,
    completion_body,
    completion_logprobs,
    error_body,
    new_id,
    usage,
    usage_chunk,
)
from .request import Request as Job
from .scheduler import QueueFull
from .server import Server


def unknown_model(server: Server, name: str) -> APIError:
    why = server.registry.current.unavailable.get(name)
    if why is not None:                          # a damaged file: the rest of the store serves
        return APIError(503, f"The model '{name}' is unavailable: a file it needs is damaged or missing; the "
                             "store's operator can run `crma store verify --repair`", "server_error",
                        param="model", code="model_unavailable")
    return APIError(404, f"The model '{name}' does not exist; this store serves: "
                         f"{', '.join(server.registry.current.models())}", param="model", code="model_not_found")


def completion_prompts(server: Server, prompt) -> list[tuple[list[int], str]]:
    """(token ids, text) of each prompt: a string, a list of strings, token ids, or a list of token-id lists."""
    vocab = server.live.model.config.vocab_size
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
    out = []
    for p in prompt:
        if isinstance(p, list):
            if any(not 0 <= t < vocab for t in p):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
            out.append((list(p), server.tokenizer.decode(p)))
            continue
        try:
            out.append((text_ids(server.tokenizer, p), p))
        except Exception as err:                           # the text, not the server: a 400, never retried
            raise APIError(400, f"the prompt could not be tokenised: {err}", param="prompt",
                           code="invalid_value") from None
    return out


async def serve(server: Server, request: Request, req, prompts: list[tuple[list[int], str]], route_text: str | None,
                chat: bool, token_text, key: ApiKey | None = None):
    """Queue one job per prompt and answer: a stream (one prompt) or one body with a choice per prompt."""
    if req.stream and len(prompts) > 1:
        raise APIError(400, "several prompts cannot be streamed; send them without stream, or one at a time",
                       param="prompt", code="unsupported_parameter")
    jobs = []
    try:
        for ids, text in prompts:
            snap = server.registry.acquire()    # bound to the manifest current now, to its end
            try:
                job = _job(server, snap, req, ids, route_text if route_text is not None else text, chat)
                if key is not None:
                    job.key_id, job.allowed = key.id, key.domains
                server.scheduler.submit(job)
            except BaseException:
                server.registry.release(snap)
                raise
            jobs.append(job)
    except QueueFull as err:
        for job in jobs:
            job.cancelled = True
        raise APIError(503, f"the server is busy ({err}); retry shortly", "server_busy", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    except BaseException:
        for job in jobs:
            job.cancelled = True
        raise
    rid = new_id("chatcmpl" if chat else "cmpl")
    headers = {IGNORED_HEADER: ", ".join(req._ignored)} if req._ignored else None
    echo = None if chat or not req.echo else prompts[0][1]
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventSourceResponse(_stream(jobs[0], rid, req.model, chat, include_usage, token_text, echo,
                                           len(prompts[0][1])), ping=15, sep="\n", headers=headers)
    bodies = await asyncio.gather(*(_collect(job, request, rid, req.model, chat, token_text,
                                             None if chat or not req.echo else text, len(text), index)
                                    for index, (job, (_, text)) in enumerate(zip(jobs, prompts))))
    for body in bodies:
        if not isinstance(body, dict):                    # a client that went away
            return body
    body = bodies[0]
    if len(bodies) > 1:
        body["choices"] = [{**b["choices"][0], "crma": b["crma"]} for b in bodies]   # each prompt routed apart
        body["usage"] = usage(sum(b["usage"]["prompt_tokens"] for b in bodies),
                              sum(b["usage"]["completion_tokens"] for b in bodies))
    return JSONResponse(body, headers=headers)


def _job(server: Server, snap, req, ids: list[int], route_text: str, chat: bool) -> Job:
    """Check the request against the snapshot and the limits; the scheduler's job for it."""
    cfg = server.cfg
    if req.model not in snap.models():
        raise unknown_model(server, req.model)
    max_tokens = req.max_tokens if req.max_tokens is not None else (cfg.default_max_tokens if chat else 16)
    if max_tokens > cfg.max_tokens:
        raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of {cfg.max_tokens}",
                       param="max_tokens", code="invalid_value")
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
    if len(ids) > cfg.max_prompt_tokens or len(ids) + max_tokens > server.max_positions:
        raise APIError(400, f"the prompt has {len(ids)} tokens; the limit is {cfg.max_prompt_tokens} prompt tokens "
                            f"and {server.max_positions} tokens with max_tokens", param="prompt",
                       code="context_length_exceeded")
    if chat:
        logprobs, echo = ((req.top_logprobs or 0) if req.logprobs else None), False
    else:
        logprobs, echo = req.logprobs, bool(req.echo)
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                            top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=tuple(req.stop or ()),
                            logprobs=logprobs, echo=echo)
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


def _logprobs(job: Job, chat: bool, entries: list, token_text, offset: int) -> dict | None:
    if job.params.logprobs is None:
        return None
    return chat_logprobs(entries, token_text) if chat else completion_logprobs(entries, token_text, offset)


async def _collect(job: Job, request: Request, rid: str, model: str, chat: bool, token_text, echo: str | None,
                   prompt_chars: int, index: int = 0):
    """Wait for the whole completion, watching for a client that disconnects meanwhile."""
    text, entries, info, finished, checked = [], [], None, False, time.monotonic()
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
                entries += data.get("prompt_logprobs", [])
            elif kind == "text":
                text.append(data["text"])
                entries += data.get("logprobs", [])
            elif kind == "error":
                finished = True
                raise APIError(500, data["message"], "server_error")
            else:
                finished = True
                use = usage(data["prompt_tokens"], data["completion_tokens"])
                answer = (echo or "") + "".join(text)
                lp = _logprobs(job, chat, entries, token_text, 0 if echo is not None else prompt_chars)
                if chat:
                    return chat_body(rid, model, answer, data["finish_reason"], info, use, lp)
                return completion_body(rid, model, answer, data["finish_reason"], info, use, lp, index)
    finally:
        if not finished:
            job.cancelled = True


async def _stream(job: Job, rid: str, model: str, chat: bool, include_usage: bool, token_text, echo: str | None,
                  prompt_chars: int):
    """Server-sent events: one chunk per released piece of text (with its tokens' log-probabilities when
    asked), a last chunk with the finish reason (and usage, if asked), then `data: [DONE]`."""
    info, offset = None, 0 if echo is not None else prompt_chars
    async for kind, data in _events(job):
        if kind == "route":
            info = data["info"]
            if chat:
                yield {"data": json.dumps(chat_chunk(rid, model, {"role": "assistant", "content": ""}, None, info))}
            elif echo is not None:
                lp = _logprobs(job, chat, data.get("prompt_logprobs", []), token_text, offset)
                offset += len(echo)
                yield {"data": json.dumps(completion_body(rid, model, echo, None, info, None, lp))}
        elif kind == "text":
            lp = _logprobs(job, chat, data.get("logprobs", []), token_text, offset)
            offset += len(data["text"])
            body = chat_chunk(rid, model, {"content": data["text"]}, None, info, lp) if chat else \
                completion_body(rid, model, data["text"], None, info, None, lp)
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

