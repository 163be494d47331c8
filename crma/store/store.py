"""The model store: what is registered, which version is current, and the writes that change it: `Store`,
a read-only view of the manifest, and the `Writer` that `Store.writer` opens under the lock.

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

A job that trains before it writes (`crma add`) reads the manifest first, without the lock, and at
registration calls `Writer.check_unchanged(manifest_it_read, ...)` under the lock: if another writer
changed what the job trained from (created the store, added a backbone version, registered the same
domain), nothing is written and the StoreError says what changed.

`Store` and `Writer` share this module because each names the other (`Store.writer` yields a Writer,
`Writer.store` is a Store). The pieces they use are modules of their own: paths and checksums (paths.py),
the lock (lock.py), the manifest and version folders (manifest.py), a killed writer's leftovers (sweep.py).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from ..routing import Router
from ..version import __version__
from .lock import LOCK_WAIT, add_bytes, check_writable, write_error, writer_lock
from .manifest import (
    check_name,
    check_same_store,
    new_manifest,
    new_version_dir,
    next_version,
    parse_version,
    read_manifest,
    write_manifest,
)
from .paths import MANIFEST, PARTS, StoreError, file_hashes, now, store_dir, verify_files
from .sweep import part_folders, sweep_orphans

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

    def versions(self, domain: str) -> list[int]:
        """Every registered adapter version of `domain`, oldest first."""
        entry = self._domain(domain)
        return sorted(int(v) for v, meta in self.manifest["adapters"][entry["adapter"]].items()
                      if meta["domain"] == domain or entry["adapter"] != domain)

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
    def writer(root: str | Path, command: str = "", create: dict | None = None, wait: float = LOCK_WAIT,
               on_wait: Callable[[str], None] | None = None):
        """Hold the store's writer lock; yields a Writer. `create` (model spec, fingerprint, condition,
        settings) makes a new store in an empty or missing folder; without it the store must exist, and
        with it an existing store must be of that model and condition. A held lock is waited for up to
        `wait` seconds. A write that fails for the disk's sake (full, read-only, permissions) is a
        StoreError naming the path, and the new version folders are removed."""
        root = Path(root)
        with writer_lock(root, command, wait, on_wait):
            created = False
            if os.path.lexists(root / MANIFEST):
                manifest = read_manifest(root)
                if create is not None:
                    check_same_store(root, manifest, create)
            elif create is None:
                raise StoreError(f"{root}: not a crma store (no {MANIFEST})")
            else:
                manifest, created = new_manifest(**create), True
            w = Writer(root, manifest, command, created)
            try:
                sweep_orphans(root, manifest)
                yield w
            except BaseException as err:
                w.discard()
                clean = write_error(err, root, w._committed)
                if clean is not None:
                    raise clean from err
                raise

    @staticmethod
    def check_writable(root: str | Path, adapter: str, manifest: dict | None) -> None:
        """Before training an adapter for the store at `root` (manifest None: a new store): the folder can be
        written, no writer holds the lock, the folders the add writes into are real ones, the disk has room."""
        root = Path(root)
        check_writable(root, add_bytes(root, manifest, adapter), folders=(*PARTS, f"adapters/{adapter}"))
        part_folders(root)                 # a link in place of any part folder: refused now, not after training


class Writer:
    """Changes to one store under its lock. New version folders are written at once; nothing is
    visible to readers until commit() replaces the manifest."""

    def __init__(self, root: Path, manifest: dict, command: str, created: bool = False):
        self.root, self.manifest, self.command = root, manifest, command
        self.created = created                       # the manifest is new: this writer creates the store
        self._new_dirs: list[Path] = []
        self._committed = False

    @property
    def store(self) -> Store:
        view = Store.__new__(Store)
        view.root, view.manifest = self.root, self.manifest
        return view

    def check_unchanged(self, since: dict | None, domain: str, adapter: str) -> None:
        """Refuse (StoreError, nothing written) to register what a job trained from `since`, the manifest it
        read before training (None: there was no store), when the store changed meanwhile in a way that
        matters: it was created (or re-created, or deleted), its newest backbone version is another one (the
        trained backbone's parent is no longer current), or `domain` or `adapter` changed. Other changes (a
        frozen store's other domains, rollbacks and removals of other domains) are kept: the router is
        updated from the store as it is now."""
        now_, changes = self.manifest, []
        if since is None:
            if not self.created:
                changes.append(f"the store was created meanwhile (model {now_['model']['spec']}, condition "
                               f"{now_['condition']}), but this job trained for a new store")
        elif self.created:
            changes.append("the store was deleted meanwhile")
        elif (now_.get("created"), now_["model"], now_["condition"]) != \
                (since.get("created"), since["model"], since["condition"]):
            changes.append(f"the store was replaced meanwhile (created {now_.get('created')}, model "
                           f"{now_['model']['spec']}, condition {now_['condition']})")
        else:
            before, after = since["backbone"]["current"], now_["backbone"]["current"]
            if before != after:
                changes.append(f"its newest backbone is now v{after}, but this job trained from "
                               + (f"v{before}" if before else "no backbone"))
            if since["domains"].get(domain) != now_["domains"].get(domain):
                entry = now_["domains"].get(domain)
                state = "removed" if entry and entry["status"] == "removed" else f"now v{entry['current']}" \
                    if entry else "gone"
                changes.append(f"domain {domain!r} changed meanwhile ({state})")
            elif set(since["adapters"].get(adapter, {})) != set(now_["adapters"].get(adapter, {})):
                changes.append(f"adapter {adapter!r} has a new version")
        if changes:
            done = now_["log"][len(since["log"]):] if since is not None and not self.created else now_["log"]
            meanwhile = "; ".join(f"{e['op']} {e.get('domain', '')}".rstrip() + (f" (`{e['command']}`)" if
                                  e.get("command") else "") for e in done[-3:])
            raise StoreError(f"{self.root}: the store changed while this job trained: {'; '.join(changes)}"
                             + (f" [meanwhile: {meanwhile}]" if meanwhile else "")
                             + ". Nothing was written: run it again to train on the store as it is now")

    def _write_version(self, rel: str, taken: list[int], save) -> tuple[int, str, dict]:
        version = next_version(store_dir(self.root, rel), taken)
        with new_version_dir(self.root, rel, version) as tmp:
            save(tmp)
        target = self.root / rel / f"v{version}"
        self._new_dirs.append(target)
        return version, str(target.relative_to(self.root)), file_hashes(target, self.root)

    def add_backbone_version(self, save, meta: dict) -> int:
        """save(folder) writes the backbone files; the new version becomes current at commit."""
        if self.manifest["condition"] != "modular":
            raise StoreError(f"{self.root}: a {self.manifest['condition']} store has no backbone; "
                             "only a modular store takes backbone versions")
        bb = self.manifest["backbone"]
        version, rel, files = self._write_version("backbone", [int(v) for v in bb["versions"]], save)
        bb["versions"][str(version)] = {"path": rel, "files": files, "created": now(),
                                        "parent": bb["current"], **meta}
        bb["current"] = version
        return version

    def add_adapter_version(self, domain: str, adapter: str, save, meta: dict) -> int:
        """save(folder) writes the PEFT adapter files; `domain` is served by it from commit on."""
        check_name(domain)
        pinned = meta.get("backbone_version")
        if self.manifest["condition"] == "modular" and (pinned is None or
                                                         str(pinned) not in self.manifest["backbone"]["versions"]):
            raise StoreError(f"{self.root}: a modular store's adapter must be pinned to one of its backbone "
                             f"versions, and {domain}'s is pinned to {pinned}; nothing was written")
        versions = self.manifest["adapters"].setdefault(adapter, {})
        version, rel, files = self._write_version(f"adapters/{adapter}", [int(v) for v in versions], save)
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
        version, rel, files = self._write_version("router", [int(v) for v in rt["versions"]], router.save_to)
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
                parent = d.parent                      # an adapter folder made for this write only
                if parent != self.root and parent.parent.name == "adapters" and not any(parent.iterdir()):
                    parent.rmdir()

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
        router_version = self.add_router_version(router, f"rollback {domain} to v{target}")
        previous = entry["current"]
        entry["current"] = target
        self.log("rollback", domain=domain, version=target, previous=previous, router_version=router_version)
        return target

    def remove(self, domain: str) -> None:
        """Stop serving `domain` (its versions stay on disk; adding it again starts a new version)."""
        store = self.store
        store._domain(domain)
        router = store.router()
        if domain in router.names:
            router.remove_domain(domain)
        router_version = self.add_router_version(router, f"remove {domain}")
        self.manifest["domains"][domain]["status"] = "removed"
        self.log("remove", domain=domain, router_version=router_version)
