"""The decoding scheduler: one background thread owns the model and runs continuous batching.

    scheduler.submit(request)      # any thread; QueueFull when the waiting queue is at its limit
    scheduler.call(fn)             # run fn in the model's thread between two steps (reload, ...)

Loop: run pending calls; admit waiting requests while the batch has room (route `auto` ones with
their snapshot's router, prefill each alone with its own adapter and backbone version, sample its
first token, join the batch cache); then one decoding step for every row at once (rows mixing
adapters and backbone versions, mixed.py); retire finished and cancelled rows. A request therefore
waits only for the step in progress, never for another adapter's requests to finish.

Each row's token is sampled and accepted on its own: a failure there (its sampler, its text) ends that
request with an error event and the other rows go on decoding. Only a failure of the shared forward
fails the rows of the step, and the scheduler then starts again from an empty batch.

`mode="per-adapter"` (the benchmark's baseline) admits only requests with the running batch's
adapter and backbone version, i.e. serves one adapter at a time.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import itertools
import logging
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..routing import BASE, route_texts
from .batch import BatchCache, new_cache
from .decoding import Sampler, SamplingParams, TextStream, logprob_entry, next_tokens, prompt_logprobs
from .mixed import MixedForward
from .registry import AUTO, Registry, Route, Snapshot

log = logging.getLogger("crma.serve")
_ids = itertools.count(1)


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None


def release_free_memory() -> None:
    """Return the heap memory a finished batch freed to the OS (glibc's malloc_trim), so that the server's
    resident memory falls back after a burst instead of keeping its high-water mark."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class QueueFull(Exception):
    """The waiting queue is at its limit."""


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


class Scheduler:
    def __init__(self, live, registry: Registry, max_batch: int = 16, max_queue: int = 64, mode: str = "mixed",
                 lora_mixing: str = "gather", telemetry=None):
        if mode not in ("mixed", "per-adapter"):
            raise ValueError(f"mode must be mixed or per-adapter, got {mode!r}")
        self.live, self.registry, self.telemetry = live, registry, telemetry
        self.max_batch, self.max_queue, self.mode = max_batch, max_queue, mode
        self.forward = MixedForward(live, registry, lora_mixing)
        self.batch = BatchCache()
        self.rows: list[Request] = []
        self.waiting: deque[Request] = deque()
        self.calls: deque[tuple] = deque()
        self.cv = threading.Condition()
        self.stopping = False
        eos = live.model.generation_config.eos_token_id if hasattr(live.model, "generation_config") else None
        eos = eos if isinstance(eos, (list, tuple)) else [eos]
        self.eos = {int(e) for e in [*eos, live.tokenizer.eos_token_id] if e is not None}
        self.stats = {"steps": 0, "prefills": 0, "tokens": 0, "finished": 0, "cancelled": 0, "errors": 0,
                      "max_rows": 0, "max_adapters_in_step": 0, "max_backbones_in_step": 0,
                      "prefill_seconds": 0.0, "step_seconds": 0.0, "step_tokens": 0}
        self.thread = threading.Thread(target=self._run, name="crma-scheduler", daemon=True)
        self._busy = False

    # ---- any thread -------------------------------------------------------------------------
    def start(self) -> Scheduler:
        self.thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        self.thread.join(timeout)

    def submit(self, req: Request) -> None:
        """Queue a request whose snapshot the caller acquired (Registry.acquire); from here on the
        scheduler releases it when the request ends."""
        with self.cv:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (limit {self.max_queue})")
            self.waiting.append(req)
            self.cv.notify_all()

    def call(self, fn) -> Future:
        """Run fn() in the model's thread before the next step; the Future holds its result."""
        fut: Future = Future()
        with self.cv:
            self.calls.append((fn, fut))
            self.cv.notify_all()
        return fut

    def load(self) -> dict:
        return {"active": len(self.rows), "queued": len(self.waiting)}

    # ---- the model's thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cv:
                if not (self.stopping or self.calls or self.waiting or self.rows) and self._busy:
                    self._busy = False
                    release_free_memory()              # idle again: give the batch's freed memory back
                while not (self.stopping or self.calls or self.waiting or self.rows):
                    self.cv.wait(timeout=1.0)
                self._busy = True
                if self.stopping:
                    break
                calls = list(self.calls)
                self.calls.clear()
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as err:          # noqa: BLE001 - handed to the caller
                        fut.set_exception(err)
            try:
                with torch.inference_mode():
                    self._admit()
                    if self.rows:
                        self._step()
                if self.telemetry is not None:
                    self.telemetry.queue.set(len(self.waiting))
                    self.telemetry.running.set(len(self.rows))
            except Exception as err:                      # the shared forward failed: never let the thread die
                log.exception("decoding step failed")
                rows, self.rows, self.batch = self.rows, [], BatchCache()
                for req in rows:
                    self._fail(req, f"internal error while decoding: {err}")
        for req in [*self.rows, *self.waiting]:
            self._finish(req, None, error="the server is shutting down")
        self.forward.close()

    def _admit(self) -> None:
        with self.cv:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self._finish(req, None, cancelled=True)
            room = self.max_batch - len(self.rows)
            if room <= 0 or not self.waiting:
                return
            pending = list(self.waiting) if self.mode == "per-adapter" else list(itertools.islice(self.waiting, room))
        self._route([r for r in pending if r.route is None])
        pending = [r for r in pending if r.route is not None]
        if self.mode == "per-adapter" and pending:
            key = self.rows[0].route.key if self.rows else pending[0].route.key
            pending = [r for r in pending if r.route.key == key][:room]
        with self.cv:
            for req in pending:
                self.waiting.remove(req)
        for req in pending:
            try:
                self._prefill(req)
            except Exception as err:
                log.exception("prefill failed")
                self._fail(req, f"internal error while reading the prompt: {err}")

    def _route(self, reqs: list[Request]) -> None:
        """Resolve each request's route; `auto` ones with their snapshot's router, one text at a time
        (a padded routing batch would make a decision depend, in the last bits, on its neighbours)."""
        for req in reqs:
            snap = req.snapshot
            if req.model != AUTO or snap.router is None or not snap.router.names:
                req.route = snap.routes[BASE if req.model == AUTO else req.model]
                continue
            try:
                router = snap.router_for(req.allowed)
                if router is None:                     # a key none of whose domains this store serves
                    req.route = snap.routes[BASE]
                    continue
                dec = route_texts(router, self.live.model, self.live.tokenizer, [req.route_text])[0]
            except Exception as err:
                log.exception("routing failed")
                with self.cv:
                    self.waiting.remove(req)
                self._finish(req, None, error=f"internal error while routing: {err}")
                continue
            req.route = snap.routes.get(dec.domain) or snap.routes.get(BASE)
            req.confidence, req.runner_up, req.reason = float(dec.confidence), dec.runner_up, dec.reason
            if self.telemetry is not None:
                self.telemetry.decided(dec.domain, dec.reason)
            if req.route is None:                      # routed to a model a damaged file took out
                with self.cv:
                    self.waiting.remove(req)
                self._finish(req, None, error=f"the router chose {dec.domain}, which is unavailable (a file it "
                                              "needs is damaged; see /health)")

    def _prefill(self, req: Request) -> None:
        req.sampler = Sampler(req.params)
        req.stream = TextStream(self.live.tokenizer, req.params.stop)
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.live.model.device)
        cache = new_cache(self.live.model.config)
        started = time.perf_counter()
        echo = req.params.echo and req.params.logprobs is not None
        logits = self.forward(ids, [req.route], cache, all_positions=echo)          # (1, vocab) / (1, s, vocab)
        self.stats["prefill_seconds"] += time.perf_counter() - started
        self.stats["prefills"] += 1
        if echo:
            req.emit("route", info=req.info(),
                     prompt_logprobs=prompt_logprobs(logits[0], req.prompt_ids, req.params.logprobs))
            logits = logits[:, -1, :]
        else:
            req.emit("route", info=req.info())
        if req.params.max_tokens == 0:                 # echo only: the prompt scored, nothing generated
            self._finish(req, "length")
            return
        if self._take(req, logits[0], next_tokens(logits, [req.sampler])[0]):
            self.batch.add(cache, len(req.prompt_ids))
            self.rows.append(req)

    def _step(self) -> None:
        live = [i for i, r in enumerate(self.rows) if not r.cancelled]
        for req in [r for r in self.rows if r.cancelled]:
            self._finish(req, None, cancelled=True)
        self._keep(live)
        if not self.rows:
            return
        mask, positions = self.batch.step_inputs()
        ids = torch.tensor([[r.last_token] for r in self.rows], dtype=torch.long, device=mask.device)
        routes = [r.route for r in self.rows]
        started = time.perf_counter()
        logits = self.forward(ids, routes, self.batch.cache, attention_mask=mask, position_ids=positions)
        self.batch.stepped()
        s = self.stats
        s["step_seconds"] += time.perf_counter() - started
        s["step_tokens"] += len(routes)
        s["steps"] += 1
        s["max_rows"] = max(s["max_rows"], len(routes))
        s["max_adapters_in_step"] = max(s["max_adapters_in_step"], len({r.adapter for r in routes}))
        s["max_backbones_in_step"] = max(s["max_backbones_in_step"], len({r.backbone_version for r in routes}))
        tokens = next_tokens(logits, [r.sampler for r in self.rows])
        keep = [i for i, req in enumerate(self.rows) if self._take(req, logits[i], tokens[i])]
        self._keep(keep)

    def _keep(self, rows: list[int]) -> None:
        if len(rows) != len(self.rows):
            self.rows = [self.rows[i] for i in rows]
            self.batch.keep(rows)

    def _take(self, req: Request, logits: torch.Tensor, token: int | Exception) -> bool:
        """Accept one row's next token (chosen by next_tokens for all rows at once); False when the request
        is finished. A failure here (its draw, its text stream) is the request's own: it ends with an error,
        the other rows go on."""
        try:
            if isinstance(token, Exception):
                raise token
            if req.params.logprobs is not None and token not in self.eos:
                req.pending_logprobs.append(logprob_entry(logits, token, req.params.logprobs))
            return self._accept(req, token)
        except Exception as err:
            log.exception("sampling failed for request %s", req.id)
            self._fail(req, f"could not choose the next token: {err}")
            return False

    def _fail(self, req: Request, message: str) -> None:
        """End `req` with an error event, whatever state it is in."""
        if req.finish_reason is not None or req.errored:
            return
        req.errored = True
        try:
            self._finish(req, None, error=message)
        except Exception:                                  # noqa: BLE001 - the other rows must still be failed
            log.exception("could not end request %s", req.id)

    def _accept(self, req: Request, token: int) -> bool:
        """Take a sampled token; emit text; False when the request is finished."""
        now = time.perf_counter()
        req.first_token_at = req.first_token_at or now
        req.generated += 1
        req.last_token = token
        self.stats["tokens"] += 1
        if token in self.eos:
            self._finish(req, "stop", req.stream.finish())
            return False
        piece = req.stream.push(token)
        if req.stream.stopped:
            self._finish(req, "stop", piece)
            return False
        if req.generated >= req.params.max_tokens:
            self._finish(req, "length", piece + req.stream.finish())
            return False
        if piece:
            req.emit_text(piece)
        return True

    def _finish(self, req: Request, reason: str | None, piece: str = "", error: str | None = None,
                cancelled: bool = False) -> None:
        req.finish_reason = reason
        if piece or req.pending_logprobs:
            req.emit_text(piece)
        if error is not None:
            self.stats["errors"] += 1
            req.emit("error", message=error)
        elif cancelled:
            self.stats["cancelled"] += 1
        else:
            self.stats["finished"] += 1
            req.emit("done", finish_reason=reason, prompt_tokens=len(req.prompt_ids),
                     completion_tokens=req.generated, text=req.stream.text if req.stream else "")
        if self.telemetry is not None:
            status = "500" if error is not None else "cancelled" if cancelled else "200"
            try:
                self.telemetry.finished(req.record(status), req.route_text, req.stream.text if req.stream else "")
            except Exception:                              # noqa: BLE001 - never the request's failure
                log.exception("could not record request %s", req.id)
        self.registry.release(req.snapshot)
        if req.snapshot is not self.registry.current and req.snapshot.refs == 0:
            self.registry.collect()                    # the last request of an old manifest: unload
