"""One completion as the scheduler runs it: token ids in, events out (to an asyncio queue on the server's loop)."""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

from .decoding import Sampler, SamplingParams, TextStream
from .registry import Route, Snapshot

_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    """One completion: token ids in, events out (to an asyncio queue on the server's loop)."""

    prompt_ids: list[int]
    params: SamplingParams
    model: str                         # a domain, "auto" or "base"
    snapshot: Snapshot
    route_text: str = ""               # what `auto` routes on
    loop: asyncio.AbstractEventLoop | None = None
    queue: asyncio.Queue | None = None
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False            # set by the client side (disconnect); honoured at the next step
    route: Route | None = None
    confidence: float | None = None
    runner_up: str | None = None
    generated: int = 0
    finish_reason: str | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token: int = 0
    sampler: Sampler | None = None
    stream: TextStream | None = None
    errored: bool = False
    key_id: str | None = None          # the API key's id (logs and metrics; never the key)
    allowed: frozenset[str] | None = None   # domains the key may use: `auto` routes among them only
    reason: str = ""                   # why the router abstained (auto -> base)
    pending_logprobs: list = field(default_factory=list)   # entries of tokens whose text is not sent yet

    def emit_text(self, piece: str) -> None:
        """A piece of text, with the log-probability entries of the tokens it completes (when asked)."""
        if self.params.logprobs is None:
            self.emit("text", text=piece)
        else:
            entries, self.pending_logprobs = self.pending_logprobs, []
            self.emit("text", text=piece, logprobs=entries)

    def emit(self, kind: str, **data) -> None:
        if self.loop is not None and self.queue is not None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, data))
            except RuntimeError:                       # the server's event loop is already closed
                pass

    def record(self, status: str) -> dict:
        """The routing log's line and the metrics' labels for this request as it ends."""
        r, now = self.route, time.perf_counter()
        return {"id": self.id, "key": self.key_id, "model": self.model, "domain": r.domain if r else None,
                "confidence": self.confidence, "runner_up": self.runner_up, "reason": self.reason or None,
                "adapter_version": r.adapter_version if r else None,
                "backbone_version": r.backbone_version if r else None, "prompt_tokens": len(self.prompt_ids),
                "completion_tokens": self.generated,
                "ttft_s": None if self.first_token_at is None else round(self.first_token_at - self.arrived, 6),
                "total_s": round(now - self.arrived, 6), "status": status}

    def info(self) -> dict:
        """Which domain served it, with what (the response's `crma` field)."""
        r = self.route
        return {"domain": r.domain, "confidence": self.confidence, "runner_up": self.runner_up,
                "reason": self.reason or None, "adapter": r.adapter, "adapter_version": r.adapter_version,
                "backbone_version": r.backbone_version, "requested": self.model,
                "manifest_updated": self.snapshot.updated}
