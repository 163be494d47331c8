"""Paths under a model store: the names crma gives things there, every path resolved to a real folder or
file inside the store, the files' checksums, and the pieces every write uses.

A symbolic link anywhere below the store folder is refused, never followed: `store_dir` and `store_file`
check a path component by component, and `link_error` is the StoreError that names the link. The
manifest records the sha256 of every file (`file_hashes`), and every load checks the files it uses
(`verify_files`). StoreError, the error of the whole package, is defined here, at the bottom of its imports.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from pathlib import Path

from ..io import temp_pattern

MANIFEST = "manifest.json"
LOCK = ".lock"
TEMP_PREFIX = ".tmp-"                        # every temporary folder or file a writer makes inside the store
MANIFEST_TEMP = temp_pattern(MANIFEST)       # write_manifest's temp files (crma.io.atomic_path)
VERSION_DIR = re.compile(r"v[1-9][0-9]*")    # the only folder names a writer creates in a part folder
PARTS = ("backbone", "router", "adapters")   # the part folders (adapters/<name>/ below adapters)


class StoreError(ValueError):
    """A store that cannot be read or written as asked; the message names the file or field."""


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


# ---- checksums -------------------------------------------------------------------------------------------
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


# ---- what every write uses -------------------------------------------------------------------------------
def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pause_hook(point: str) -> None:
    """Test hook: CRMA_STORE_PAUSE=<point> makes a writer announce the point on stdout and sleep there,
    so a test can SIGKILL it at an exact moment of a write; with CRMA_STORE_RESUME=<file> it goes on once
    that file exists (a test orders two writers)."""
    if os.environ.get("CRMA_STORE_PAUSE") == point:
        print(f"CRMA_STORE_PAUSED {point}", flush=True)
        resume, deadline = os.environ.get("CRMA_STORE_RESUME"), time.monotonic() + 600
        while time.monotonic() < deadline and not (resume and os.path.exists(resume)):
            time.sleep(0.05)
