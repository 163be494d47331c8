"""What the server serves: immutable snapshots of a store's manifest, and hot reload between them.

    snap = registry.prepare()          # any thread: read + verify the new manifest (None: unchanged)
    registry.install(snap)             # the model's thread: load new adapters/backbones, then switch

A `Snapshot` maps every servable model name to a `Route`: the in-memory adapter (`<adapter>@v<k>`,
so two versions of one domain can be loaded side by side) and the backbone version it is pinned to.
Besides each domain (its current version), every registered version is servable as `DOMAIN@vK`, on
the backbone version it was trained with (pinned) or the newest (latest), so two versions can be
compared side by side (ServeConfig.versions; off by default: current versions only).
A request is bound to the snapshot that was current when it arrived and keeps it to the end, so a
reload never changes a request in flight; a snapshot's adapters and backbone versions stay loaded
until no request holds it any more. A file that fails verification takes out only what needs it (a
domain, `auto` when it is the router, `base` when it is the newest backbone): the snapshot lists it as
unavailable, with the reason, and serves the rest.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
import warnings
from dataclasses import dataclass, field

from ..engine.live import LiveModel
from ..routing import BASE
from ..store import Store, StoreError
from ..store.paths import verify_files
from ..store.verify import damaged_parts

AUTO = "auto"
log = logging.getLogger("crma.serve")


@dataclass(frozen=True)
class Route:
    domain: str                      # the domain, or "base"
    adapter: str | None              # in-memory adapter name (None: no domain adapter)
    adapter_version: int | None
    backbone_version: int | None     # None: the store has no backbone

    @property
    def key(self) -> tuple:
        return (self.adapter, self.backbone_version)


@dataclass(eq=False)
class Snapshot:
    store: Store
    router: object | None
    routes: dict[str, Route]         # domain -> route, plus "base"
    serial: int
    updated: str
    loaded_at: float = field(default_factory=time.time)
    refs: int = 0                    # requests bound to it that have not finished
    unavailable: dict[str, str] = field(default_factory=dict)   # model name -> why it cannot be served
    _subsets: dict = field(default_factory=dict)                  # domains -> router restricted to them

    def models(self) -> list[str]:
        return [d for d in self.routes if d != BASE] + [m for m in (AUTO, BASE) if m not in self.unavailable]

    def router_for(self, domains: frozenset[str] | None):
        """The router, or a copy that knows only `domains` (an API key's); None when it knows none of them."""
        if domains is None or self.router is None:
            return self.router
        keep = frozenset(d for d in self.router.names if d in domains)
        if keep == frozenset(self.router.names):
            return self.router
        if not keep:
            return None
        if keep not in self._subsets:
            sub = copy.deepcopy(self.router)
            for name in [n for n in sub.names if n not in keep]:
                sub.remove_domain(name)
            self._subsets[keep] = sub
        return self._subsets[keep]

    def adapters(self) -> dict[str, tuple[str, int]]:
        """{in-memory name: (store adapter, version)} this snapshot may use."""
        out = {}
        for r in self.routes.values():
            if r.adapter is not None:
                out[r.adapter] = (self.store.adapter_name(r.domain), r.adapter_version)
        return out

    def backbones(self) -> set[int]:
        return {r.backbone_version for r in self.routes.values() if r.backbone_version is not None}


class Registry:
    """The current snapshot, every snapshot still held by a request, and what they keep loaded."""

    def __init__(self, live: LiveModel, root, backbone_mode: str = "pinned", versions: bool = False):
        self.live, self.root, self.backbone_mode, self.versions = live, root, backbone_mode, versions
        self.current: Snapshot | None = None
        self.stack = None                      # VersionStack of the needed backbone versions
        self._held: list[Snapshot] = []        # older snapshots with requests in flight
        self._serial = 0
        self._lock = threading.Lock()          # guards refs / _held / current
        self.reload_lock = threading.Lock()    # one reload at a time (admin endpoint and watcher)

    # ---- any thread --------------------------------------------------------------------------
    def prepare(self, force: bool = False) -> Snapshot | None:
        """Read the store's manifest and verify every file it references (sha256); None when it is
        the manifest already served. Parts with a damaged file are left out and listed in the snapshot's
        `unavailable`; raises StoreError only when the store as a whole cannot be served."""
        store = Store(self.root)
        if not force and self.current is not None and store.manifest == self.current.store.manifest:
            return None
        live = self.live
        if store.model_spec != live.spec or store.fingerprint != live.base_fingerprint:
            raise StoreError(f"{self.root}: the store's base model changed ({store.model_spec}); restart the server")
        if (store.manifest["backbone"]["current"] is None) != (live.backbone is None):
            raise StoreError(f"{self.root}: the store's backbone appeared or vanished; restart the server")
        damage = damaged_parts(store, self.backbone_mode)
        unavailable = dict(damage.domains)
        if damage.router:
            unavailable[AUTO] = f"the router cannot be used: {damage.router}"
        if damage.backbone:
            unavailable[BASE] = f"the newest backbone cannot be used: {damage.backbone}"
        for name, why in unavailable.items():
            log.error("%s: %s is unavailable: %s", self.root, name, why)
        routes = {}
        for domain in store.domains():
            if domain in unavailable:
                continue
            meta = store.adapter_meta(domain)
            routes[domain] = Route(domain, f"{meta['adapter']}@v{meta['version']}", meta["version"],
                                   store.backbone_version(domain, self.backbone_mode))
        if self.versions:
            for domain in list(routes):
                self._version_routes(store, domain, routes, unavailable)
        if BASE not in unavailable:
            routes[BASE] = Route(BASE, None, None, store.backbone_version(None))
        router = None if damage.router else store.router()
        self._serial += 1
        return Snapshot(store, router, routes, self._serial, store.manifest.get("updated", ""),
                        unavailable=unavailable)

    def _version_routes(self, store: Store, domain: str, routes: dict, unavailable: dict) -> None:
        """`DOMAIN@vK` for every registered version of `domain` whose files are whole."""
        newest = store.backbone_version(None)
        for version in store.versions(domain):
            if version == routes[domain].adapter_version:        # the current one, verified by damaged_parts
                routes[f"{domain}@v{version}"] = routes[domain]
                continue
            meta = store.adapter_meta(domain, version)
            backbone = newest if newest is None or self.backbone_mode == "latest" else meta["backbone_version"]
            files = dict(meta["files"])
            if backbone is not None:
                files.update(store.backbone_meta(backbone)["files"])
            try:
                verify_files(store.root, files)
            except StoreError as err:
                unavailable[f"{domain}@v{version}"] = str(err).replace(f"{store.root}/", "")
                continue
            routes[f"{domain}@v{version}"] = Route(domain, f"{meta['adapter']}@v{version}", version, backbone)

    def acquire(self) -> Snapshot:
        """The current snapshot, held for one request until release(): what it needs stays loaded."""
        with self._lock:
            snap = self.current
            snap.refs += 1
            return snap

    def release(self, snap: Snapshot) -> None:
        with self._lock:
            snap.refs -= 1

    # ---- the model's thread only ---------------------------------------------------------------
    def install(self, snap: Snapshot) -> None:
        """Load what `snap` needs that is not loaded yet, then make it current. On failure nothing
        changes (adapters loaded for it are dropped again) and the error propagates."""
        live = self.live
        before = set(live.adapters)
        try:
            for name, (adapter, version) in snap.adapters().items():
                live.load_adapter_as(name, adapter, version, snap.store)
            for version in snap.backbones():
                live.backbone_state(version, snap.store)
        except BaseException:
            for name in set(live.adapters) - before:
                live.drop_adapter(name)
            raise
        with self._lock:
            old = self.current
            self.current = snap
            if old is not None:
                self._held.append(old)
        live.store = snap.store
        self.collect()

    def collect(self) -> None:
        """Drop adapters and backbone versions no snapshot in use needs; rebuild the version stack."""
        with self._lock:
            self._held = [s for s in self._held if s.refs > 0]
            live_snaps = [self.current, *self._held]
        needed = set().union(*(s.adapters() for s in live_snaps))
        for name in [n for n in self.live.adapters if "@v" in n and n not in needed]:
            try:
                with warnings.catch_warnings():      # "adapter ... was active which is now deleted"
                    warnings.simplefilter("ignore", UserWarning)
                    self.live.drop_adapter(name)
            except Exception as err:                 # PEFT refuses to delete its last adapter
                log.warning("could not unload adapter %s: %s", name, err)
        versions = sorted(set().union(*(s.backbones() for s in live_snaps)))
        if self.live.backbone is not None and (self.stack is None or self.stack.keys != versions):
            self.stack = self.live.backbone.stack_versions({v: self.live.backbone_state(v) for v in versions})

    def loaded(self) -> list[str]:
        return sorted(n for n in list(self.live.adapters) if "@v" in n)     # list(): a copy taken at once

    def held(self) -> int:
        with self._lock:
            return len([s for s in self._held if s.refs > 0])
