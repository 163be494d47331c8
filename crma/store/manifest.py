"""The model store's on-disk format: the manifest, immutable version folders, checksums, the writer lock.

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
holds the sha256 of every file of every version, and every load checks the files it uses.

Hostile or careless use: the manifest is validated when read (a missing key or a wrong type is a
StoreError naming the file and the key); every path crma reads or writes under the store is checked to be
a real folder or file inside it (a symbolic link anywhere below the store folder is refused, never
followed); the lock file is opened without following links; and a writer sweeps only what crma itself
names: `.tmp-*` (TEMP_PREFIX), the manifest's temp files, and `v<k>` version folders that no manifest
references.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from ..config import DOMAIN_NAME, check_domain_name
from ..io import atomic_path, record_write, temp_pattern

FORMAT = "crma-store-v1"
MANIFEST = "manifest.json"
LOCK = ".lock"
TEMP_PREFIX = ".tmp-"                        # every temporary folder or file a writer makes inside the store
MANIFEST_TEMP = temp_pattern(MANIFEST)       # write_manifest's temp files (crma.io.atomic_path)
VERSION_DIR = re.compile(r"v[1-9][0-9]*")    # the only folder names a writer creates in a part folder
PARTS = ("backbone", "router", "adapters")   # the part folders (adapters/<name>/ below adapters)
LOCK_WAIT = 0.5                              # seconds a writer retries a held lock (a concurrent probe) before failing


class StoreError(ValueError):
    """A store that cannot be read or written as asked; the message names the file or field."""


class StoreLocked(StoreError):
    """Another process is writing to the store."""


check_name = check_domain_name      # one rule for domain names everywhere (crma.config)


def parse_version(value: str | int) -> int:
    """'3', 'v3' or 3 -> 3."""
    text = str(value).strip().lower().removeprefix("v")
    if not text.isdigit() or int(text) < 1:
        raise StoreError(f"version {value!r} is not a version number (e.g. 2 or v2)")
    return int(text)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_texts(texts: list[str]) -> str:
    """Checksum of a list of passages (recorded instead of the text, which is never stored)."""
    digest = hashlib.sha256()
    for t in texts:
        data = t.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- paths under the store: real folders and files inside it, never a symbolic link ------------------------
def link_error(path: Path, doing: str = "wrote or deleted nothing") -> StoreError:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return StoreError(f"{path}: is a symbolic link (to {target}); crma does not follow links inside a store and "
                      f"{doing}: remove the link (a store's folders and files must be real ones inside it)")


def _check_part(root: Path, rel: str, part: str) -> None:
    if part in ("", ".", "..") or "/" in part:
        raise StoreError(f"{root}: {rel!r} is not a path inside the store")


def store_dir(root: Path, rel: str, create: bool = False) -> Path:
    """root/rel, checked component by component: each is a real folder (not a symbolic link, not '..').
    With `create`, missing folders are made; without, a missing one ends the check (the path is returned)."""
    path = root
    for part in Path(rel).parts:
        _check_part(root, rel, part)
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                return root / rel
            try:
                os.mkdir(path)
            except FileExistsError:
                pass
            st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise link_error(path)
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"{path}: not a folder (crma expects its own folder here); nothing was written")
    return path


def store_file(root: Path, rel: str) -> Path:
    """root/rel for reading: every folder on the way is a real one inside the store and the file is no link."""
    rel_path = Path(rel)
    _check_part(root, rel, rel_path.name)
    path = store_dir(root, str(rel_path.parent)) / rel_path.name
    if path.is_symlink():
        raise link_error(path, "read nothing through it")
    return path


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
        _hook("before-manifest-rename")
    _fsync_dir(root)


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
        _hook("before-version-rename")
        os.rename(tmp, target)
        record_write(target)
        _fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_hashes(folder: Path, root: Path) -> dict[str, str]:
    """{path relative to the store: sha256} of every file in a version folder."""
    return {str((folder / f.name).relative_to(root)): sha256_file(f) for f in sorted(folder.iterdir()) if f.is_file()}


def verify_files(root: Path, files: dict[str, str]) -> None:
    """Every file exists inside the store (no symbolic link on the way) and has the recorded sha256;
    else a StoreError naming it."""
    for rel, expected in files.items():
        path = store_file(root, rel)
        if not path.is_file():
            raise StoreError(f"{path}: missing (referenced by {root / MANIFEST})")
        got = sha256_file(path)
        if got != expected:
            raise StoreError(f"{path}: sha256 mismatch (manifest {expected[:16]}..., file {got[:16]}...): "
                             "the file is corrupted or was changed; it is not loaded")


# ---- the writer lock -------------------------------------------------------------------------------------
def _open_lock(root: Path) -> int:
    """The lock file, opened (created if missing) without following a link, and only if it is a plain file
    of its own: a link or hard link to another file would let the lock's truncation reach that file."""
    path = root / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise link_error(path, "opened nothing through it") from None
        raise StoreError(f"{path}: cannot open the store's writer lock ({err.strerror}); "
                         "nothing was written") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise StoreError(f"{path}: not crma's lock file (a hard link to another file, or not a plain file); "
                         "nothing was written: remove it")
    return fd


def _holder(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"


def _flock(fd: int, root: Path, mode: int, wait: float, on_wait: Callable[[str], None] | None) -> None:
    """Take the flock, retrying for `wait` seconds (a probe holds it for an instant); then StoreLocked."""
    deadline, told = time.monotonic() + wait, False
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise StoreLocked(f"{root}: another writer holds the store lock ({_holder(fd)}); "
                                  "wait for it to finish, readers are not blocked") from None
            if on_wait is not None and not told and time.monotonic() > deadline - wait + LOCK_WAIT:
                on_wait(_holder(fd))
                told = True
            time.sleep(0.05)


@contextmanager
def writer_lock(root: Path, command: str = "", wait: float = LOCK_WAIT,
                on_wait: Callable[[str], None] | None = None):
    """Exclusive writer lock (flock on STORE/.lock, released by the kernel if the process dies).
    A second writer waits up to `wait` seconds (on_wait(holder) is told once), then gets StoreLocked
    naming the holder."""
    _hook("before-lock")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"{root}: cannot create the store folder ({err.strerror})") from None
    fd = _open_lock(root)
    held = False
    try:
        _flock(fd, root, fcntl.LOCK_EX, wait, on_wait)
        held = True
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now(), "command": command})
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode("utf-8"), 0)
        except OSError as err:
            raise StoreError(f"{root / LOCK}: cannot write the writer lock ({err.strerror}); "
                             "nothing was written") from None
        yield
    finally:
        if held:
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
        os.close(fd)          # releases the flock


def check_writable(root: Path, need_bytes: int = 0, folders: tuple[str, ...] = PARTS,
                   wait: float = LOCK_WAIT) -> None:
    """Before a long job that ends in a write (`crma add`): the store folder exists or can be made and can be
    written (a probe file is created, written, fsynced and removed: this holds for root too, where
    permission bits do not), no other writer holds the lock, the `folders` it will write into are real
    folders inside the store, and the disk has `need_bytes` free. A StoreError naming the path otherwise."""
    if os.path.lexists(root) and not root.is_dir():
        raise StoreError(f"{root}: is a file, not a store folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"{root}: cannot create the store folder ({err.strerror})") from None
    fd = _open_lock(root)
    try:
        _flock(fd, root, fcntl.LOCK_SH, wait, None)      # shared: probes do not block each other
    finally:
        os.close(fd)
    for rel in folders:
        folder = store_dir(root, rel)
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise StoreError(f"{folder}: not writable by this user")
    probe = None
    try:
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX + "probe-", dir=root)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise StoreError(f"{root}: the store folder cannot be written ({err.strerror})") from None
    finally:
        if probe is not None:
            Path(probe).unlink(missing_ok=True)
    free = shutil.disk_usage(root).free
    if free < need_bytes:
        raise StoreError(f"{root}: {free / 2**20:.1f} MiB free on its disk, and this writes about "
                         f"{need_bytes / 2**20:.1f} MiB: free some space")


_OS_ERROR = re.compile(r"\(os error (\d+)\)")       # how Rust-backed writers (safetensors) report an OSError


def write_error(err: BaseException, root: Path, committed: bool) -> StoreError | None:
    """A write that failed because of the disk (full, read-only, permissions, ...) as a StoreError naming the
    path; None for anything else (a bug, an interrupt: it propagates as it is)."""
    if isinstance(err, StoreError) or not isinstance(err, Exception):
        return None
    after = ("the new manifest was written before the failure" if committed else
             "nothing was written: the store is as it was")
    if isinstance(err, OSError):
        where = err.filename or root
        return StoreError(f"{where}: {err.strerror or err} while writing to the store; {after}")
    match = _OS_ERROR.search(str(err))
    if match:
        return StoreError(f"{root}: {os.strerror(int(match.group(1)))} while writing to the store ({err}); {after}")
    return None


def _hook(point: str) -> None:
    """Test hook: CRMA_STORE_PAUSE=<point> makes a writer announce the point on stdout and sleep there,
    so a test can SIGKILL it at an exact moment of a write; with CRMA_STORE_RESUME=<file> it goes on once
    that file exists (a test orders two writers)."""
    if os.environ.get("CRMA_STORE_PAUSE") == point:
        print(f"CRMA_STORE_PAUSED {point}", flush=True)
        resume, deadline = os.environ.get("CRMA_STORE_RESUME"), time.monotonic() + 600
        while time.monotonic() < deadline and not (resume and os.path.exists(resume)):
            time.sleep(0.05)
