"""The serving process's state: the store's model, its registry of snapshots, the scheduler, the
limits, and reload (by the admin endpoint or the manifest watcher).

    server = Server.open(ServeConfig(store="models/clinic"))    # loads the model and every adapter
    server.start(); ...; server.reload(); ...; server.stop()

Only the scheduler's thread touches the model: reload reads and verifies the files on the caller's
thread, then hands the install (loading adapters into the model) to the scheduler (Scheduler.call).
"""
from __future__ import annotations

import copy
import logging
import os
import time

import torch

from ..engine.live import LiveModel
from ..store import Store, StoreError
from . import gemv
from .auth import load_keys
from .batch import new_cache
from .config import ServeConfig
from .registry import Registry
from .scheduler import Scheduler, in_passing_thread
from .telemetry import Telemetry
from .watch import ManifestWatcher

log = logging.getLogger("crma.serve")


def serving_threads(threads: int | None) -> int:
    """--threads, else $OMP_NUM_THREADS when set, else every core this process may run on."""
    if threads:
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Server:
    def __init__(self, cfg: ServeConfig, live: LiveModel, registry: Registry, scheduler: Scheduler,
                 telemetry: Telemetry | None = None, keys: tuple = ()):
        self.cfg, self.live, self.registry, self.scheduler = cfg, live, registry, scheduler
        self.telemetry = telemetry or Telemetry()
        self.keys = keys                                      # API keys (crma/serve/auth.py); () = open
        self.telemetry.manifest_served(registry.current.updated if registry.current else None)
        self.tokenizer = copy.deepcopy(live.tokenizer)        # the HTTP side's own (HF tokenizers are not
        self.started = time.time()                            # safe to share with the router's thread)
        self.max_positions = int(getattr(live.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.last_reload: dict | None = None
        self._watcher = None

    @classmethod
    def open(cls, cfg: ServeConfig) -> Server:
        """Load the store's base model, backbone and every current adapter (checksums verified)."""
        torch.set_num_threads(serving_threads(cfg.threads))                   # once, for the whole process
        keys = load_keys(list(cfg.api_key), cfg.api_key_file)        # bad keys: refused before the model loads
        live, registry = in_passing_thread(lambda: cls._load(cfg))   # no OpenMP pool left on this thread
        telemetry = Telemetry(cfg.route_log, cfg.route_log_bytes, cfg.route_log_backups, cfg.log_text)
        scheduler = Scheduler(live, registry, max_batch=cfg.max_batch, max_queue=cfg.max_queue, mode=cfg.batching,
                              lora_mixing=cfg.lora_mixing, telemetry=telemetry,
                              prefix_cache_bytes=max(0, cfg.prefix_cache_mb) << 20, packed_linears=cfg.packed_linears,
                              decode_step=cfg.decode_step, row_gemv=cfg.row_gemv)
        return cls(cfg, live, registry, scheduler, telemetry, keys)

    @staticmethod
    def _load(cfg: ServeConfig) -> tuple[LiveModel, Registry]:
        store = Store(cfg.store)
        live = LiveModel.open(store, device=cfg.device, damaged_ok=True)   # damaged parts: see Registry.prepare
        try:
            new_cache(live.model.config)                       # refuse models the batch cache cannot hold
        except ValueError as err:
            raise StoreError(f"{cfg.store}: {err}") from None
        registry = Registry(live, cfg.store, cfg.backbone, cfg.versions)
        registry.install(registry.prepare(force=True))
        return live, registry

    def start(self) -> Server:
        self.scheduler.start()
        if self.cfg.watch:
            self._watcher = ManifestWatcher(self, self.cfg.watch_interval).start()
        return self

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        self.scheduler.stop()
        self.telemetry.close()

    def reload(self, force: bool = False, timeout: float = 600.0) -> dict:
        """Serve the store's current manifest from now on (blocking; not on the event loop).
        Raises StoreError, and keeps serving the previous snapshot, when it cannot be served."""
        with self.registry.reload_lock:
            started = time.perf_counter()
            try:
                snap = in_passing_thread(lambda: self.registry.prepare(force))   # from the watcher or a pool
                if snap is None:
                    result = {"status": "unchanged"}
                else:
                    try:
                        self.scheduler.call(lambda: self.registry.install(snap)).result(timeout)
                    except StoreError:
                        raise
                    except Exception as err:              # e.g. PEFT cannot load an adapter folder
                        raise StoreError(f"{self.cfg.store}: could not load the new manifest's models: {err}") from err
                    result = {"status": "reloaded"}
            except StoreError as err:
                self.last_reload = {"status": "refused", "error": str(err), "at": time.time()}
                self.telemetry.reloads.labels(result="refused").inc()
                log.error("reload refused, still serving the previous manifest: %s", err)
                raise
            cur = self.registry.current
            result.update(seconds=round(time.perf_counter() - started, 4), models=cur.models(),
                          manifest_updated=cur.updated, snapshot=cur.serial)
            self.last_reload = {**result, "at": time.time()}
            self.telemetry.reloads.labels(result="ok").inc()
            self.telemetry.manifest_served(cur.updated)
            if snap is not None:
                log.info("reloaded %s in %.3fs: %s", self.cfg.store, result["seconds"], ", ".join(cur.models()))
            return result

    def change(self, action: str, domain: str, to: str | None = None) -> dict:
        """Roll `domain` back (to version `to`, default the one before) or remove it, in the store as
        `crma store rollback|remove` would (its lock, a new manifest written atomically), then serve the
        new manifest. StoreError (nothing changed) for an unknown domain or version, or a busy store."""
        with Store.writer(self.cfg.store, f"crma serve: {action} {domain} (admin endpoint)") as w:
            if action == "rollback":
                version = w.rollback(domain, to)
            elif action == "remove":
                w.remove(domain)
                version = None
            else:
                raise ValueError(f"unknown store change {action!r}")
            w.commit()
        log.info("%s %s%s by the admin endpoint", action, domain, f" to v{version}" if version else "")
        return {"action": action, "domain": domain, "version": version, "reload": self.reload()}

    def health(self) -> dict:
        cur = self.registry.current
        return {"status": "degraded" if cur.unavailable else "ok", "store": str(self.cfg.store),
                "models": cur.models(), "unavailable": dict(cur.unavailable), "snapshot": cur.serial,
                "manifest_updated": cur.updated, **self.scheduler.load(), "loaded_adapters": self.registry.loaded(),
                "held_snapshots": self.registry.held(), "stats": dict(self.scheduler.stats),
                "last_reload": self.last_reload, "uptime_s": round(time.time() - self.started, 1),
                "batching": self.cfg.batching, "lora_mixing": self.cfg.lora_mixing,
                "packed_linears": self.cfg.packed_linears, "decode_step": self.cfg.decode_step,
                "row_gemv": self.cfg.row_gemv and gemv.compile_error() is None,
                "max_batch": self.cfg.max_batch, "watch": self.cfg.watch}

