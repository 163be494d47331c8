"""The OpenAI wire format: request models (pydantic), error objects, response and chunk bodies.

Requests accept OpenAI's parameters; those the server cannot honour are accepted only at their
neutral value (n=1, logprobs off, no penalties, ...) and refused otherwise with a clear 400 naming the
parameter. Fields it does not know are accepted and ignored, as clients send many (`store`,
`metadata`, `service_tier`, a message's `refusal`, ...): each name is logged once and listed in the
response's `X-Crma-Ignored-Params` header. Known parameters of other servers whose value would change the
output (`top_k`, `min_p`, `repetition_penalty`, `functions`, a message's `tool_calls`, ...) are refused
unless neutral, since ignoring them would silently change what the client asked for.
Every response carries an extra `crma` object (served domain, router confidence, adapter and
backbone versions), which OpenAI clients keep as an extra field.
"""
from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

log = logging.getLogger("crma.serve")
IGNORED_HEADER = "X-Crma-Ignored-Params"

# parameters other servers know whose value changes the output: refused unless at their neutral value
REFUSED_UNLESS_NEUTRAL = {
    "top_k": lambda v: v in (None, 0, -1), "min_p": lambda v: v in (None, 0), "min_tokens": lambda v: v in (None, 0),
    "repetition_penalty": lambda v: v in (None, 1), "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"), "modalities": lambda v: v in (None, ["text"]),
    "audio": lambda v: v is None, "prediction": lambda v: v is None, "web_search_options": lambda v: v is None,
    "guided_json": lambda v: v is None, "guided_regex": lambda v: v is None, "guided_choice": lambda v: v is None,
    "tool_calls": lambda v: not v,
}
_logged: set[str] = set()
_logged_lock = threading.Lock()


def _ignore(name: str, ignored: list[str]) -> None:
    ignored.append(name)
    with _logged_lock:
        if name not in _logged:
            _logged.add(name)
            log.info("ignoring the request field %r (unknown to this server; logged once)", name)


def _tolerate(cls, body: dict) -> tuple[dict, list[str]]:
    """The body without the fields `cls` does not know (and without unknown fields of chat messages), and
    their names; APIError 400 for a field whose non-neutral value would change the output."""
    ignored: list[str] = []
    kept = {}
    for key, value in body.items():
        if key in cls.model_fields:
            kept[key] = value
            continue
        neutral = REFUSED_UNLESS_NEUTRAL.get(key)
        if neutral is not None and not neutral(value):
            raise APIError(400, f"'{key}' is not supported by this server (only its neutral value is accepted)",
                           param=key, code="unsupported_parameter")
        _ignore(key, ignored)
    messages = kept.get("messages")
    if isinstance(messages, list):
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                clean.append(m)
                continue
            extra = [k for k in m if k not in Message.model_fields]
            for k in extra:
                neutral = REFUSED_UNLESS_NEUTRAL.get(k)
                if neutral is not None and not neutral(m[k]):
                    raise APIError(400, f"'messages.{i}.{k}' is not supported by this server (tool calls are not)",
                                   param=f"messages.{i}.{k}", code="unsupported_parameter")
                if f"messages.*.{k}" not in ignored:
                    _ignore(f"messages.*.{k}", ignored)
            clean.append({k: v for k, v in m.items() if k not in extra})
        kept["messages"] = clean
    return kept, ignored


class APIError(Exception):
    """An error the client gets as an OpenAI error object with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _neutral(value, *allowed) -> bool:
    return value is None or any(value == a for a in allowed)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    _ignored: list[str] = PrivateAttr(default_factory=list)   # unknown fields the request carried (ignored)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)                 # 0: only with echo (completions: scoring a prompt)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)   # < 1e-5: greedy (decoding.py)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    def conflict(self) -> tuple[str, str] | None:
        """(parameter, why) when parameters contradict each other."""
        return None

    def unsupported(self) -> list[str]:
        """Parameters given at a value this server cannot honour."""
        bad = []
        if not _neutral(self.n, 1):
            bad.append("n")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _neutral(getattr(self, name), 0):
                bad.append(name)
        if self.logit_bias:
            bad.append("logit_bias")
        return bad


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None                              # the prompt in the text, and its tokens' logprobs
    best_of: int | None = None
    logprobs: int | None = Field(None, ge=0, le=5)        # OpenAI's legacy: this many alternatives per token
    suffix: str | None = None

    def conflict(self) -> tuple[str, str] | None:
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens=0 is only for scoring a prompt with echo=true"
        return None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        bad += [k for k, ok in (("best_of", _neutral(self.best_of, 1)), ("suffix", _neutral(self.suffix, "")))
                if not ok]
        return bad


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None                          # each generated token's log-probability
    top_logprobs: int | None = Field(None, ge=0, le=20)   # and this many alternatives (needs logprobs)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _tokens(self):
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    def conflict(self) -> tuple[str, str] | None:
        if self.max_tokens == 0:
            return "max_tokens", "max_tokens must be >= 1"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs=true"
        return None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        bad += [k for k, ok in (("tools", not self.tools), ("tool_choice", _neutral(self.tool_choice, "none")),
                                ("response_format", _neutral(self.response_format, {"type": "text"})))
                if not ok]
        return bad


_UNION_TAG = re.compile(r"(str|int|float|bool|none|.*\[.*\]|function-.*)")


def _not_text(value) -> tuple | None:
    """The path of the first string (key or value) that is not valid Unicode text (a lone surrogate,
    which JSON's \\ud800 escapes can carry), else None. Iterative: any nesting json.loads accepts."""
    todo = [((), value)]
    while todo:
        path, v = todo.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(v, dict):
            todo += reversed([item for k, x in v.items() for item in (((*path, k), k), ((*path, k), x))])
        elif isinstance(v, list):
            todo += reversed([((*path, i), x) for i, x in enumerate(v)])
    return None


def _param(loc: tuple) -> str | None:
    """A pydantic error location as OpenAI names a parameter ('messages.0.role'), without the union
    member tags pydantic adds ('prompt.list[int].0' -> 'prompt.0')."""
    parts = [str(p) for k, p in enumerate(loc) if k == 0 or isinstance(p, int) or not _UNION_TAG.fullmatch(str(p))]
    return ".".join(parts) or None


def _safe(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def parse(cls, body) -> _Common:
    """Validate a decoded JSON body, strictly typed (no "4" or true for a number; an integer is a valid
    float, as OpenAI's); APIError 400 naming the first offending parameter."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    bad_text = _not_text(body)
    if bad_text is not None:
        param = _safe(".".join(str(p) for p in bad_text)) or None
        raise APIError(400, f"Invalid value for '{param}': not valid Unicode text (a lone surrogate)",
                       param=param, code="invalid_value")
    body, ignored = _tolerate(cls, body)
    try:
        req = cls.model_validate(body, strict=True)
        req._ignored = ignored
    except ValidationError as err:
        first = err.errors()[0]
        param = _param(first["loc"])
        if first["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {param}", param=param) from None
        if first["type"] == "missing":
            raise APIError(400, f"Missing required parameter: '{param}'", param=param,
                           code="missing_required_parameter") from None
        raise APIError(400, f"Invalid value for '{param}': {first['msg']}", param=param, code="invalid_value") from None
    clash = req.conflict()
    if clash is not None:
        raise APIError(400, f"Invalid value for '{clash[0]}': {clash[1]}", param=clash[0], code="invalid_value")
    bad = req.unsupported()
    if bad:
        raise APIError(400, f"'{bad[0]}' is not supported by this server at that value (supported: max_tokens, "
                            "temperature, top_p, seed, stop, n=1, stream, logprobs, top_logprobs, echo)",
                       param=bad[0], code="unsupported_parameter")
    return req


# ---- response bodies ---------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries: list[tuple], token_text, offset: int) -> dict:
    """OpenAI's legacy completions `logprobs` object from (token, logprob, [(alt, logprob)...]) entries:
    tokens, token_logprobs, top_logprobs ({token text: logprob}; None for a prompt's first token) and the
    character offset of each token in the returned text, from `offset`."""
    tokens, offsets = [], []
    for tok, _, _ in entries:
        offsets.append(offset)
        tokens.append(token_text(tok))
        offset += len(tokens[-1])
    tops = [None if lp is None else {token_text(a): v for a, v in alts} for _, lp, alts in entries]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(entries: list[tuple], token_text) -> dict:
    """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    def one(tok: int, lp: float) -> dict:
        text = token_text(tok)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**one(tok, lp), "top_logprobs": [one(a, v) for a, v in alts]} for tok, lp, alts in entries]}


def completion_body(rid: str, model: str, text: str, finish: str | None, info: dict, use: dict | None,
                    logprobs: dict | None = None, index: int = 0) -> dict:
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}], "crma": info}
    if use is not None:
        body["usage"] = use
    return body


def chat_body(rid: str, model: str, text: str, finish: str | None, info: dict, use: dict | None,
              logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": logprobs}], "usage": use, "crma": info}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, info: dict, logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}], "crma": info}


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": use}
