"""The model store: what is registered, which version is current, and the writes that change it.

    store = Store("models/clinic")                 # read-only view of the manifest (no lock)
    store.domains()                                 # active domains, in the order they were added
    store.adapter_meta("medical")                   # the current version's record
    store.backbone_version("medical", "pinned")     # the backbone version that adapter is served with

    with Store.writer("models/clinic", command) as w:   # one writer at a time (flock)
        v = w.add_adapter_version("medical", save_fn, meta)
        w.commit()                                  # the manifest now points at the new versions

A `Writer` writes new immutable version folders, then `commit()` replaces the manifest; until then,
readers (and a process that dies) see the previous manifest. Rollback and remove only rewrite the
manifest and the router.
"""
from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from ..config import CONDITIONS, CRMAConfig, LoraSettings
from ..routing import Router, RouterConfig
from ..version import __version__
from .manifest import (
    FORMAT,
    MANIFEST,
    StoreError,
    check_name,
    file_hashes,
    new_version_dir,
    next_version,
    now,
    parse_version,
    read_manifest,
    verify_files,
    write_manifest,
    writer_lock,
)

BACKBONE_MODES = ("pinned", "latest")


class Store:
    """A read-only view of a store's manifest as it was when opened (`reload()` re-reads it)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise StoreError(f"{self.root}: no such store directory")
        self.manifest = read_manifest(self.root)

    @classmethod
    def view(cls, root: str | Path, manifest: dict) -> Store:
        """A view of a manifest already in memory (processes on other machines than the writer's)."""
        store = cls.__new__(cls)
        store.root, store.manifest = Path(root), manifest
        return store

    def reload(self) -> Store:
        self.manifest = read_manifest(self.root)
        return self

    # ---- what is registered --------------------------------------------------------------------
    @property
    def condition(self) -> str:
        return self.manifest["condition"]

    @property
    def model_spec(self) -> str:
        return self.manifest["model"]["spec"]

    @property
    def fingerprint(self) -> dict:
        return self.manifest["model"]["fingerprint"]

    def domains(self) -> list[str]:
        """Active (not removed) domains in the order they were first added."""
        return [d for d, e in self.manifest["domains"].items() if e["status"] == "active"]

    def _domain(self, name: str) -> dict:
        entry = self.manifest["domains"].get(name)
        if entry is None or entry["status"] != "active":
            have = ", ".join(self.domains()) or "none"
            why = "was removed" if entry else "is not in this store"
            raise StoreError(f"{self.root}: domain {name!r} {why} (domains: {have})")
        return entry

    def adapter_name(self, domain: str) -> str:
        """The adapter serving `domain` (the domain's own name; `shared` in a naive run)."""
        return self._domain(domain)["adapter"]

    def adapter_meta(self, domain: str, version: int | None = None) -> dict:
        """The record of `domain`'s adapter version (default: current)."""
        entry = self._domain(domain)
        version = entry["current"] if version is None else version
        versions = self.manifest["adapters"][entry["adapter"]]
        if str(version) not in versions:
            raise StoreError(f"{self.root}: {entry['adapter']} has no version {version} "
                             f"(versions: {', '.join('v' + v for v in versions)})")
        return {"version": int(version), **versions[str(version)]}

    def backbone_version(self, domain: str | None, mode: str = "pinned") -> int | None:
        """Backbone version a domain is served with: the one its adapter was trained with (pinned) or
        the newest (latest); for no domain (base) the newest. None when the store has no backbone."""
        if mode not in BACKBONE_MODES:
            raise StoreError(f"backbone mode {mode!r}: choose pinned or latest")
        if self.manifest["backbone"]["current"] is None:
            return None
        if domain is None or mode == "latest":
            return self.manifest["backbone"]["current"]
        return self.adapter_meta(domain)["backbone_version"]

    def backbone_meta(self, version: int) -> dict:
        return {"version": version, **self.manifest["backbone"]["versions"][str(version)]}

    def router_meta(self) -> dict | None:
        cur = self.manifest["router"]["current"]
        return None if cur is None else {"version": cur, **self.manifest["router"]["versions"][str(cur)]}

    def path(self, rel: str) -> Path:
        return self.root / rel

    def verify(self, files: dict[str, str] | None = None) -> None:
        """Check sha256 of `files` (default: every file the current manifest references)."""
        verify_files(self.root, files if files is not None else self.current_files())

    def current_files(self) -> dict[str, str]:
        m = self.manifest
        files: dict[str, str] = {}
        for d in self.domains():
            meta = self.adapter_meta(d)
            files.update(meta["files"])
            if meta.get("backbone_version"):
                files.update(self.backbone_meta(meta["backbone_version"])["files"])
        if m["backbone"]["current"] is not None:
            files.update(self.backbone_meta(m["backbone"]["current"])["files"])
        if self.router_meta():
            files.update(self.router_meta()["files"])
        return files

    def router(self, version: int | None = None) -> Router | None:
        """The router at `version` (default: current), checksum verified; None before the first add."""
        version = self.manifest["router"]["current"] if version is None else version
        if version is None:
            return None
        meta = self.manifest["router"]["versions"][str(version)]
        verify_files(self.root, meta["files"])
        return Router.load(self.root / meta["path"])

    # ---- writing ----------------------------------------------------------------------------
    @staticmethod
    @contextmanager
    def writer(root: str | Path, command: str = "", create: dict | None = None):
        """Hold the store's writer lock; yields a Writer. `create` (model spec, fingerprint, condition,
        settings) makes a new store in an empty or missing folder; without it the store must exist."""
        root = Path(root)
        with writer_lock(root, command):
            if (root / MANIFEST).exists():
                manifest = read_manifest(root)
            elif create is None:
                raise StoreError(f"{root}: not a crma store (no {MANIFEST})")
            else:
                manifest = new_manifest(**create)
            sweep_orphans(root, manifest)
            w = Writer(root, manifest, command)
            try:
                yield w
            except BaseException:
                w.discard()
                raise


def referenced_paths(manifest: dict) -> set[str]:
    """Every version folder the manifest points at (current or not: rollback may need them)."""
    paths = {v["path"] for v in manifest["backbone"]["versions"].values()}
    paths |= {v["path"] for versions in manifest["adapters"].values() for v in versions.values()}
    return paths | {v["path"] for v in manifest["router"]["versions"].values()}


def sweep_orphans(root: Path, manifest: dict) -> list[str]:
    """Remove version folders no manifest ever referenced: a writer killed after writing them and
    before replacing the manifest. Only called under the writer lock, so no write is in progress."""
    keep = referenced_paths(manifest)
    removed = []
    for folder in [*root.glob("backbone/v*"), *root.glob("router/v*"), *root.glob("adapters/*/v*")]:
        rel = str(folder.relative_to(root))
        if folder.is_dir() and rel not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(rel)
    return removed


def creation_settings(condition: str, model_spec: str, fingerprint: dict, *, seed: int, crma: CRMAConfig,
                      lora: LoraSettings, router: RouterConfig | None = None) -> dict:
    """The `create` argument of Store.writer for a new store of a core condition (naive, frozen, modular)."""
    if condition not in CONDITIONS:
        raise StoreError(f"condition: must be {', '.join(CONDITIONS)}, got {condition!r}")
    return {"model_spec": model_spec, "fingerprint": fingerprint, "condition": condition,
            "settings": {"seed": seed, "crma": asdict(crma), "lora": asdict(lora),
                         "router": asdict(router or RouterConfig()), "created_with": time.strftime("%Y-%m-%d")}}


def new_manifest(model_spec: str, fingerprint: dict, condition: str, settings: dict) -> dict:
    return {"format": FORMAT, "crma_version": __version__, "created": now(), "updated": now(),
            "model": {"spec": model_spec, "fingerprint": fingerprint}, "condition": condition,
            "settings": settings, "backbone": {"current": None, "versions": {}},
            "domains": {}, "adapters": {}, "router": {"current": None, "versions": {}}, "log": []}


class Writer:
    """Changes to one store under its lock. New version folders are written at once; nothing is
    visible to readers until commit() replaces the manifest."""

    def __init__(self, root: Path, manifest: dict, command: str):
        self.root, self.manifest, self.command = root, manifest, command
        self._new_dirs: list[Path] = []
        self._committed = False

    @property
    def store(self) -> Store:
        view = Store.__new__(Store)
        view.root, view.manifest = self.root, self.manifest
        return view

    def _write_version(self, folder: Path, taken: list[int], save) -> tuple[int, str, dict]:
        version = next_version(folder, taken)
        with new_version_dir(folder, version) as tmp:
            save(tmp)
        target = folder / f"v{version}"
        self._new_dirs.append(target)
        return version, str(target.relative_to(self.root)), file_hashes(target, self.root)

    def add_backbone_version(self, save, meta: dict) -> int:
        """save(folder) writes the backbone files; the new version becomes current at commit."""
        bb = self.manifest["backbone"]
        version, rel, files = self._write_version(self.root / "backbone", [int(v) for v in bb["versions"]], save)
        bb["versions"][str(version)] = {"path": rel, "files": files, "created": now(),
                                        "parent": bb["current"], **meta}
        bb["current"] = version
        return version

    def add_adapter_version(self, domain: str, adapter: str, save, meta: dict) -> int:
        """save(folder) writes the PEFT adapter files; `domain` is served by it from commit on."""
        check_name(domain)
        versions = self.manifest["adapters"].setdefault(adapter, {})
        version, rel, files = self._write_version(self.root / "adapters" / adapter,
                                                  [int(v) for v in versions], save)
        versions[str(version)] = {"path": rel, "files": files, "created": now(), "domain": domain,
                                  "crma_version": __version__, **meta}
        entry = self.manifest["domains"].get(domain)
        if entry is None:
            self.manifest["domains"][domain] = {"adapter": adapter, "current": version, "status": "active",
                                                "added": now()}
        else:
            entry.update(adapter=adapter, current=version, status="active")
        return version

    def set_domain_version(self, domain: str, adapter: str, version: int) -> None:
        """Point `domain` at an existing adapter version (naive runs: every domain at the newest shared)."""
        entry = self.manifest["domains"].setdefault(domain, {"adapter": adapter, "status": "active", "added": now()})
        entry.update(adapter=adapter, current=version, status="active")

    def add_router_version(self, router, reason: str) -> int:
        rt = self.manifest["router"]
        version, rel, files = self._write_version(self.root / "router", [int(v) for v in rt["versions"]],
                                                  router.save_to)
        rt["versions"][str(version)] = {"path": rel, "files": files, "created": now(), "reason": reason,
                                        "domains": list(router.names)}
        rt["current"] = version
        return version

    def log(self, op: str, **fields) -> None:
        self.manifest["log"].append({"time": now(), "op": op, **fields, "command": self.command})

    def commit(self) -> None:
        write_manifest(self.root, self.manifest)
        self._committed = True

    def discard(self) -> None:
        """An aborted write (an exception, not a kill): remove the version folders it made."""
        if not self._committed:
            for d in self._new_dirs:
                shutil.rmtree(d, ignore_errors=True)

    # ---- manifest-only changes --------------------------------------------------------------
    def rollback(self, domain: str, to: int | str | None = None) -> int:
        """Serve `domain` with an earlier adapter version (default: the one before the current),
        and its router statistics as they were when that version was registered."""
        store = self.store
        entry = store._domain(domain)
        versions = sorted(int(v) for v in self.manifest["adapters"][entry["adapter"]])
        if to is None:
            earlier = [v for v in versions if v < entry["current"]]
            if not earlier:
                raise StoreError(f"{domain}: no version before v{entry['current']} to roll back to")
            target = earlier[-1]
        else:
            target = parse_version(to)
            if target not in versions:
                raise StoreError(f"{domain}: no version v{target} (versions: {', '.join(f'v{v}' for v in versions)})")
        if target == entry["current"]:
            raise StoreError(f"{domain}: v{target} is already current")
        meta = store.adapter_meta(domain, target)
        router = store.router()
        router.take_domain(store.router(meta["router_version"]), domain)
        self.add_router_version(router, f"rollback {domain} to v{target}")
        previous = entry["current"]
        entry["current"] = target
        self.log("rollback", domain=domain, version=target, previous=previous)
        return target

    def remove(self, domain: str) -> None:
        """Stop serving `domain` (its versions stay on disk; adding it again starts a new version)."""
        store = self.store
        store._domain(domain)
        router = store.router()
        if domain in router.names:
            router.remove_domain(domain)
        self.add_router_version(router, f"remove {domain}")
        self.manifest["domains"][domain]["status"] = "removed"
        self.log("remove", domain=domain)
