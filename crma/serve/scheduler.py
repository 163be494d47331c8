"""The decoding scheduler: one background thread owns the model and runs continuous batching.

    scheduler.submit(request)      # any thread; QueueFull when the waiting queue is at its limit
    scheduler.call(fn)             # run fn in the model's thread between two steps (reload, ...)

Loop: run pending calls; admit waiting requests while the batch has room (route `auto` ones with
their snapshot's router, prefill them together, bucketed by length, each row with its own adapter and
backbone version, a stored prompt prefix of the same route reused (prefill.py), sample their first
tokens, join the batch cache); then one decoding step for every row at once (rows mixing
adapters and backbone versions, mixed.py); retire finished and cancelled rows. A request therefore
waits only for the step in progress, never for another adapter's requests to finish.

Each row's token is sampled and accepted on its own: a failure there (its sampler, its text) ends that
request with an error event and the other rows go on decoding. Only a failure of the shared forward
fails the rows of the step, and the scheduler then starts again from an empty batch.

`mode="per-adapter"` (the benchmark's baseline) admits only requests with the running batch's
adapter and backbone version, i.e. serves one adapter at a time.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import logging
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future

import torch

from ..routing import BASE, route_texts
from .batch import BatchCache, new_cache
from .config import BATCHING
from .decoding import Sampler, TextStream, logprob_entry, next_tokens, prompt_logprobs
from .mixed import MixedForward
from .prefill import PrefixCache, buckets, prefill
from .registry import AUTO, Registry
from .request import Request

log = logging.getLogger("crma.serve")


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None


def in_passing_thread(fn):
    """fn() run on a new thread that ends when fn returns: for torch work outside the decoding thread
    (loading a store, preparing a reload). An OpenMP thread pool belongs to the thread that started it
    and lives as long as that thread; while two pools exist and their threads outnumber the cores,
    libgomp stops spinning between parallel regions, and the decoding thread's many small regions each
    wait for a sleeping worker (benchmarks/results/thread_pools.md: one SmolLM2 stream on 2 cores, median
    16.9 tok/s after loading on the main thread, 20.7 tok/s after loading on a passing thread)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as err:                    # noqa: BLE001 - raised again in the caller
            box["error"] = err

    thread = threading.Thread(target=run, name="crma-load", daemon=True)      # Ctrl-C does not wait for it
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def release_free_memory() -> None:
    """Return the heap memory a finished batch freed to the OS (glibc's malloc_trim), so that the server's
    resident memory falls back after a burst instead of keeping its high-water mark."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class QueueFull(Exception):
    """The waiting queue is at its limit."""


class Scheduler:
    def __init__(self, live, registry: Registry, max_batch: int = 16, max_queue: int = 64, mode: str = "mixed",
                 lora_mixing: str = "gather", telemetry=None, prefix_cache_bytes: int = 256 << 20,
                 packed_linears: str = "on", decode_step: bool = True, row_gemv: bool = True):
        if mode not in BATCHING:
            raise ValueError(f"mode must be one of {BATCHING}, got {mode!r}")
        self.live, self.registry, self.telemetry = live, registry, telemetry
        self.max_batch, self.max_queue, self.mode = max_batch, max_queue, mode
        self.forward = MixedForward(live, registry, lora_mixing, packed_linears, decode_step, row_gemv)
        self.batch = BatchCache()
        self.prefixes = PrefixCache(prefix_cache_bytes)
        self.pad_id = live.tokenizer.pad_token_id or 0
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
                      "prefill_seconds": 0.0, "step_seconds": 0.0, "step_tokens": 0, "prefill_batches": 0,
                      "prefix_tokens_reused": 0}
        self.thread = threading.Thread(target=self._run, name="crma-scheduler", daemon=True)
        self._busy = False

    # ---- any thread -------------------------------------------------------------------------
    def start(self) -> Scheduler:
        """Start the scheduler's thread and return once its first work is done: packing the model's linear
        layers and compiling its decoding kernels (forward.prepare), which no request should wait for."""
        self.thread.start()
        self.call(self.forward.prepare).result()
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
        echo = [r for r in pending if r.params.echo and r.params.logprobs is not None]
        for req in echo:                               # every prompt position's logits: read alone
            try:
                self._prefill_echo(req)
            except Exception as err:
                log.exception("prefill failed")
                self._fail(req, f"internal error while reading the prompt: {err}")
        rest = [r for r in pending if not (r.params.echo and r.params.logprobs is not None)]
        if rest:
            self._prefill(rest)

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

    def _prefill(self, reqs: list[Request]) -> None:
        """Read the prompts of requests admitted together: bucketed by the length left to read after
        the longest stored prefix of their route (prefill.py), one forward per bucket."""
        for req in reqs:
            req.sampler = Sampler(req.params)
            req.stream = TextStream(self.live.tokenizer, req.params.stop)
        pasts = [self.prefixes.lookup(r.route.key, r.prompt_ids) for r in reqs]
        for group in buckets([len(r.prompt_ids) - p.length for r, p in zip(reqs, pasts, strict=True)]):
            rows = [reqs[i] for i in group]
            started = time.perf_counter()
            try:
                logits, cache, mask = prefill(self.forward, self.live.model.config, [r.route for r in rows],
                                              [r.prompt_ids for r in rows], [pasts[i] for i in group],
                                              self.live.model.device, self.pad_id)
                for i, req in enumerate(rows):
                    if self.prefixes.wants(req.route.key, req.prompt_ids):
                        real = mask[i].bool()                                      # its prompt's columns
                        self.prefixes.store(req.route.key, req.prompt_ids, [x.keys[i][:, real] for x in cache.layers],
                                            [x.values[i][:, real] for x in cache.layers])
                self._count_prefill(started, len(rows), sum(pasts[i].length for i in group))
                self._join(rows, logits, cache, mask)
            except Exception as err:
                log.exception("prefill failed")
                for req in rows:                       # (_fail leaves alone the ones that already ended)
                    self._fail(req, f"internal error while reading the prompt: {err}")

    def _prefill_echo(self, req: Request) -> None:
        """A request that asked for its prompt's log-probabilities (echo): read alone, every position's logits."""
        req.sampler = Sampler(req.params)
        req.stream = TextStream(self.live.tokenizer, req.params.stop)
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.live.model.device)
        cache = new_cache(self.live.model.config)
        started = time.perf_counter()
        logits = self.forward(ids, [req.route], cache, all_positions=True)            # (1, s, vocab)
        self._count_prefill(started, 1, 0)
        req.emit("route", info=req.info(),
                 prompt_logprobs=prompt_logprobs(logits[0], req.prompt_ids, req.params.logprobs))
        self._join([req], logits[:, -1, :], cache, torch.ones_like(ids), announced=True)

    def _count_prefill(self, started: float, rows: int, reused: int) -> None:
        s = self.stats
        s["prefill_seconds"] += time.perf_counter() - started
        s["prefills"] += rows
        s["prefill_batches"] += 1
        s["prefix_tokens_reused"] += reused

    def _join(self, reqs: list[Request], logits: torch.Tensor, cache, mask: torch.Tensor,
              announced: bool = False) -> None:
        """After a prefill: each request's route event and first token; the ones still going join the batch.
        logits (b, vocab), cache and mask (b, L) as prefill returns them."""
        tokens = next_tokens(logits, [r.sampler for r in reqs])
        keep = []
        for i, req in enumerate(reqs):
            if not announced:
                req.emit("route", info=req.info())
            if req.params.max_tokens == 0:             # scoring only: the prompt read, nothing generated
                self._finish(req, "length")
            elif self._take(req, logits[i], tokens[i]):
                keep.append(i)
        self.batch.add(cache, mask, keep)
        self.rows.extend(reqs[i] for i in keep)

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
