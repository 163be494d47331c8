"""One writer at a time, and the checks around a write: the writer lock (flock on STORE/.lock, opened
without following links, naming its holder), `check_writable` (before a long job that ends in a write: the
folder can be written, no writer holds the lock, the disk has room; `add_bytes` estimates what an add
writes), and `write_error` (a write that failed for the disk's sake, as a StoreError naming the path).
Readers never take the lock.
"""
from __future__ import annotations

import errno
import fcntl
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

from .paths import LOCK, PARTS, TEMP_PREFIX, StoreError, link_error, now, pause_hook, store_dir

LOCK_WAIT = 0.5                              # seconds a writer retries a held lock (a concurrent probe) before failing


class StoreLocked(StoreError):
    """Another process is writing to the store."""


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
    pause_hook("before-lock")
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


# ---- before a write: can it be written -------------------------------------------------------------------
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


NEW_STORE_BYTES = 32 * 2**20       # an add to a new store: one adapter, backbone and router (SmolLM2: ~15 MB)


def add_bytes(root: Path, manifest: dict | None, adapter: str) -> int:
    """About what one add writes: the newest adapter version, backbone and router versions again, plus a
    quarter (a new store: NEW_STORE_BYTES)."""
    if manifest is None:
        return NEW_STORE_BYTES
    files: dict[str, str] = {}
    for table in (manifest["backbone"], manifest["router"]):
        if table["current"] is not None:
            files.update(table["versions"][str(table["current"])]["files"])
    sizes = [sum(_size(root / f) for f in v["files"]) for versions in manifest["adapters"].values()
             for v in versions.values()]
    return int(1.25 * (sum(_size(root / f) for f in files) + max(sizes, default=0))) + 2**20


def _size(path: Path) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


# ---- after a failed write: what to tell ------------------------------------------------------------------
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
