"""The model store's on-disk format: the manifest (read and validated, written atomically, a new one and the
settings it is created with) and the immutable version folders it points at.

    STORE/
      manifest.json                   the only mutable file: what is current, replaced by rename
      .lock                           held (flock) by the one writer; says who holds it
      backbone/v<k>/                  crma_backbone.safetensors + meta.json   (modular only)
      adapters/<domain>/v<k>/         adapter_config.json + adapter_model.safetensors + meta.json (PEFT format)
      router/v<k>/                    router.json + router.safetensors
      results.json, config.json       a `crma run` (a store plus its results)

A version folder is written whole under a temporary name and renamed into place; only then does the
manifest, rewritten to a temporary file and renamed over the old one, point at it. A process killed at
any moment therefore leaves the previous manifest and every file it references intact. The manifest
holds the sha256 of every file of every version, and every load checks the files it uses (paths.py).

Hostile or careless use: the manifest is validated when read (a missing key or a wrong type is a
StoreError naming the file and the key); every path crma reads or writes under the store is checked to be
a real folder or file inside it (a symbolic link anywhere below the store folder is refused, never
followed: paths.py); the lock file is opened without following links (lock.py); and a writer sweeps only
what crma itself names: `.tmp-*` (TEMP_PREFIX), the manifest's temp files, and `v<k>` version folders that
no manifest references (sweep.py).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from ..config import CONDITIONS, DOMAIN_NAME, CRMAConfig, LoraSettings, check_domain_name
from ..io import atomic_path, record_write
from ..routing import RouterConfig
from ..version import __version__
from .paths import (
    MANIFEST,
    TEMP_PREFIX,
    VERSION_DIR,
    StoreError,
    fsync_dir,
    link_error,
    now,
    pause_hook,
    store_dir,
)

FORMAT = "crma-store-v1"

check_name = check_domain_name      # one rule for domain names everywhere (crma.config)


# ---- the manifest: read (validated), written atomically ---------------------------------------------------
def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise StoreError(f"{root}: not a crma store (no {MANIFEST}); `crma add` or `crma run` creates one") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise link_error(path, "read nothing through it") from None
        raise StoreError(f"{path}: cannot read the manifest ({err.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{path}: unreadable manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{path}: not a crma store manifest "
                         f"(format={manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                         f"expected {FORMAT!r})")
    validate_manifest(manifest, path)
    return manifest


_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer", type(None): "null"}


def _key(obj: dict, key: str, kinds: tuple, where: str, path: Path):
    """obj[key], which must be of one of `kinds`; else a StoreError naming the file and the key."""
    name = f"{where}.{key}" if where else key
    if key not in obj:
        raise StoreError(f"{path}: manifest key {name!r} is missing (the file was damaged or edited by hand; "
                         "crma writes every key)")
    value = obj[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        want = " or ".join(_KINDS.get(k, k.__name__) for k in kinds)
        raise StoreError(f"{path}: manifest key {name!r} must be {want}, got {json.dumps(value)[:60]}")
    return value


def _versions(obj: dict, where: str, prefix: str, path: Path) -> dict:
    """A {"<k>": {"path": prefix/v<k>, "files": {prefix/v<k>/<file>: sha256}}} table, checked."""
    for k, record in obj.items():
        name = f"{where}.{k}"
        if not (k.isdigit() and int(k) >= 1 and str(int(k)) == k):
            raise StoreError(f"{path}: manifest key {name!r} is not a version number")
        record = _key(obj, k, (dict,), where, path)
        rel = _key(record, "path", (str,), name, path)
        if rel != f"{prefix}/v{k}":
            raise StoreError(f"{path}: manifest key {name + '.path'!r} must be {prefix}/v{k}, got {rel!r}")
        for file, digest in _key(record, "files", (dict,), name, path).items():
            if not (isinstance(digest, str) and file.rpartition("/")[0] == rel and file.rpartition("/")[2]
                    not in ("", ".", "..")):
                raise StoreError(f"{path}: manifest key {name + '.files'!r} holds {file!r}, not a file of {rel}")
    return obj


def _current(obj: dict, where: str, path: Path) -> None:
    current = _key(obj, "current", (int, type(None)), where, path)
    versions = _key(obj, "versions", (dict,), where, path)
    if current is not None and str(current) not in versions:
        raise StoreError(f"{path}: manifest key {where + '.current'!r} is v{current}, which {where}.versions lacks")


def validate_manifest(manifest: dict, path: Path) -> None:
    """Every key crma reads, with its type and cross references (current versions exist, paths are the
    store's own); a StoreError naming the file and the first key that is missing or wrong."""
    model = _key(manifest, "model", (dict,), "", path)
    _key(model, "spec", (str,), "model", path)
    _key(model, "fingerprint", (dict,), "model", path)
    condition = _key(manifest, "condition", (str,), "", path)
    settings = _key(manifest, "settings", (dict,), "", path)
    for key in ("crma", "router"):
        if key in settings or (key == "crma" and condition == "modular"):
            _key(settings, key, (dict,), "settings", path)
    for part in ("backbone", "router"):
        table = _key(manifest, part, (dict,), "", path)
        _current(table, part, path)
        _versions(table["versions"], f"{part}.versions", part, path)
    adapters = _key(manifest, "adapters", (dict,), "", path)
    backbones = manifest["backbone"]["versions"]
    for name in adapters:
        if not DOMAIN_NAME.fullmatch(name):
            raise StoreError(f"{path}: manifest key {'adapters.' + name!r} is not an adapter name")
        versions = _versions(_key(adapters, name, (dict,), "adapters", path), f"adapters.{name}",
                             f"adapters/{name}", path)
        for k, record in versions.items():
            where = f"adapters.{name}.{k}"
            _key(record, "domain", (str,), where, path)
            bb = _key(record, "backbone_version", (int, type(None)), where, path)
            if bb is not None and str(bb) not in backbones:
                raise StoreError(f"{path}: manifest key {where + '.backbone_version'!r} is v{bb}, "
                                 "which backbone.versions lacks")
            if "router_version" in record:
                _key(record, "router_version", (int, type(None)), where, path)
    for name, entry in _key(manifest, "domains", (dict,), "", path).items():
        where = f"domains.{name}"
        if not DOMAIN_NAME.fullmatch(name):
            raise StoreError(f"{path}: manifest key {where!r} is not a domain name")
        entry = _key(manifest["domains"], name, (dict,), "domains", path)
        adapter = _key(entry, "adapter", (str,), where, path)
        current = _key(entry, "current", (int,), where, path)
        if str(current) not in adapters.get(adapter, {}):
            raise StoreError(f"{path}: manifest key {where + '.current'!r} is v{current}, "
                             f"which adapters.{adapter} lacks")
        if _key(entry, "status", (str,), where, path) not in ("active", "removed"):
            raise StoreError(f"{path}: manifest key {where + '.status'!r} must be active or removed")
    for k, entry in enumerate(_key(manifest, "log", (list,), "", path)):
        if not isinstance(entry, dict):
            raise StoreError(f"{path}: manifest key 'log.{k}' must be an object")
        _key(entry, "op", (str,), f"log.{k}", path)


def write_manifest(root: Path, manifest: dict) -> None:
    """Replace the manifest atomically (temp file, fsync, rename, fsync of the folder)."""
    manifest["updated"] = now()
    with atomic_path(root / MANIFEST) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        pause_hook("before-manifest-rename")
    fsync_dir(root)


# ---- version folders -----------------------------------------------------------------------------------
def next_version(folder: Path, taken: list[int]) -> int:
    """One more than any version in the manifest or on disk (a crashed writer may have left a folder)."""
    on_disk = [int(p.name[1:]) for p in folder.iterdir() if VERSION_DIR.fullmatch(p.name)] if folder.is_dir() else []
    return max([0, *taken, *on_disk]) + 1


@contextmanager
def new_version_dir(root: Path, rel: str, version: int):
    """Yield a temp folder; on success it becomes root/rel/v<version> (never replacing anything). Every
    folder on the way is created or checked to be a real folder inside the store (no symbolic link)."""
    folder = store_dir(root, rel, create=True)
    target = folder / f"v{version}"
    if os.path.lexists(target):
        raise StoreError(f"{target} already exists; versions are immutable")
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=folder))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)                 # mkdtemp (and some writers) make owner-only modes:
        for f in tmp.iterdir():                       # readers such as a server may run as another user
            os.chmod(f, 0o666 & ~umask)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        pause_hook("before-version-rename")
        os.rename(tmp, target)
        record_write(target)
        fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def parse_version(value: str | int) -> int:
    """'3', 'v3' or 3 -> 3."""
    text = str(value).strip().lower().removeprefix("v")
    if not text.isdigit() or int(text) < 1:
        raise StoreError(f"version {value!r} is not a version number (e.g. 2 or v2)")
    return int(text)


# ---- a new store ------------------------------------------------------------------------------------
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


def check_same_store(root: Path, manifest: dict, create: dict) -> None:
    """A job that meant to create the store found one: refuse unless it is of the same model and condition."""
    have = (manifest["model"]["spec"], manifest["model"]["fingerprint"], manifest["condition"])
    want = (create["model_spec"], create["fingerprint"], create["condition"])
    if have != want:
        other = " (another base model fingerprint)" if have[0] == want[0] and have[1] != want[1] else ""
        raise StoreError(f"{root}: the store was created meanwhile by another writer, with model {have[0]} and "
                         f"condition {have[2]}{_by(manifest['log'])}, but this job trained for model {want[0]} "
                         f"and condition {want[2]}{other}; nothing was written")


def _by(log: list) -> str:
    commands = [e["command"] for e in log if e.get("command")]
    return f" (`{commands[0]}`)" if commands else ""
