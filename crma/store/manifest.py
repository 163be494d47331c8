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
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from ..config import check_domain_name
from ..io import atomic_path, record_write

FORMAT = "crma-store-v1"
MANIFEST = "manifest.json"
LOCK = ".lock"


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


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.exists():
        raise StoreError(f"{root}: not a crma store (no {MANIFEST}); `crma add` or `crma run` creates one")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StoreError(f"{path}: unreadable manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{path}: not a crma store manifest "
                         f"(format={manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                         f"expected {FORMAT!r})")
    return manifest


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


def next_version(folder: Path, taken: list[int]) -> int:
    """One more than any version in the manifest or on disk (a crashed writer may have left a folder)."""
    on_disk = [int(p.name[1:]) for p in folder.glob("v*") if p.name[1:].isdigit()] if folder.is_dir() else []
    return max([0, *taken, *on_disk]) + 1


@contextmanager
def new_version_dir(folder: Path, version: int):
    """Yield a temp folder; on success it becomes folder/v<version> (never replacing anything)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"v{version}"
    if target.exists():
        raise StoreError(f"{target} already exists; versions are immutable")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
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
    """Every file exists and has the recorded sha256; else a StoreError naming it."""
    for rel, expected in files.items():
        path = root / rel
        if not path.is_file():
            raise StoreError(f"{path}: missing (referenced by {root / MANIFEST})")
        got = sha256_file(path)
        if got != expected:
            raise StoreError(f"{path}: sha256 mismatch (manifest {expected[:16]}..., file {got[:16]}...): "
                             "the file is corrupted or was changed; it is not loaded")


@contextmanager
def writer_lock(root: Path, command: str = ""):
    """Exclusive writer lock (flock on STORE/.lock, released by the kernel if the process dies).
    A second writer gets StoreLocked naming the holder. Leftover temp folders of a killed writer
    are removed once the lock is held."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
            raise StoreLocked(f"{root}: another writer holds the store lock ({holder}); "
                              "wait for it to finish, readers are not blocked") from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now(), "command": command})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode("utf-8"), 0)
        for tmp in list(root.glob(".tmp-*")) + list(root.glob("*/.tmp-*")) + list(root.glob("adapters/*/.tmp-*")):
            shutil.rmtree(tmp, ignore_errors=True)
        yield
    finally:
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)          # releases the flock


def _hook(point: str) -> None:
    """Test hook: CRMA_STORE_PAUSE=<point> makes a writer announce the point on stdout and sleep there,
    so a test can SIGKILL it at an exact moment of a write."""
    if os.environ.get("CRMA_STORE_PAUSE") == point:
        print(f"CRMA_STORE_PAUSED {point}", flush=True)
        time.sleep(600)
