"""What a writer may remove from a store folder, and only that: the leftovers of a writer that was killed
(its temp folders and files, `v<k>` version folders no manifest references), swept under the writer lock;
and, for a folder that is to become a new store, whatever in it is not such a leftover (`creation_blockers`).
A symbolic link is never followed and never removed: one in place of a part or version folder is a
StoreError naming it.
"""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from .paths import LOCK, MANIFEST_TEMP, PARTS, TEMP_PREFIX, VERSION_DIR, link_error, store_dir


def referenced_paths(manifest: dict) -> set[str]:
    """Every version folder the manifest points at (current or not: rollback may need them)."""
    paths = {v["path"] for v in manifest["backbone"]["versions"].values()}
    paths |= {v["path"] for versions in manifest["adapters"].values() for v in versions.values()}
    return paths | {v["path"] for v in manifest["router"]["versions"].values()}


def _remove(path: Path) -> bool:
    """Remove a real folder or file (never a symbolic link, never through one)."""
    mode = os.lstat(path).st_mode
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)             # fd-based: does not follow links inside
    elif stat.S_ISREG(mode):
        path.unlink(missing_ok=True)
    else:
        return False                                        # a link (or anything else) is left alone
    return not os.path.lexists(path)


def part_folders(root: Path) -> list[str]:
    """backbone, router and adapters/<name>: the folders version folders live in, each checked to be a real
    folder inside the store (a symbolic link is a StoreError naming it)."""
    folders = []
    for part in PARTS:
        folder = store_dir(root, part)
        if folder.is_dir() and part != "adapters":
            folders.append(part)
    adapters = store_dir(root, "adapters")
    if adapters.is_dir():
        for entry in sorted(os.scandir(adapters), key=lambda e: e.name):
            if entry.is_symlink():
                raise link_error(adapters / entry.name)
            if entry.is_dir(follow_symlinks=False):
                folders.append(f"adapters/{entry.name}")
    return folders


def sweep_orphans(root: Path, manifest: dict) -> list[str]:
    """Remove what a killed writer left, and only what crma itself names: its temp folders and files
    (`.tmp-*`, the manifest's `.manifest.json.*.tmp`), and `v<k>` version folders in backbone/, router/ and
    adapters/<name>/ that the manifest does not reference. Real folders and files only: a symbolic link is
    never followed (one in place of a part or version folder is a StoreError naming it), and other names
    (`vault/`, `v2.bak/`) are never touched. Only called under the writer lock, so no write is in progress."""
    keep = referenced_paths(manifest)
    folders = part_folders(root)
    removed = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if (entry.name.startswith(TEMP_PREFIX) or MANIFEST_TEMP.fullmatch(entry.name)) and _remove(root / entry.name):
            removed.append(entry.name)
    for rel in folders:
        for entry in sorted(os.scandir(root / rel), key=lambda e: e.name):
            sub = f"{rel}/{entry.name}"
            if VERSION_DIR.fullmatch(entry.name):
                if entry.is_symlink():
                    raise link_error(root / sub)
                if sub not in keep and entry.is_dir(follow_symlinks=False) and _remove(root / sub):
                    removed.append(sub)
            elif entry.name.startswith(TEMP_PREFIX) and _remove(root / sub):
                removed.append(sub)
    return removed


def creation_blockers(root: Path) -> list[str]:
    """What in `root` keeps it from becoming a new store: every entry that is not a leftover of an
    interrupted crma writer (`.lock`, crma's temp names, part folders holding only version and temp
    folders). [] when the folder is missing, empty, or holds only such leftovers (the next writer sweeps them)."""
    if not os.path.lexists(root):
        return []
    if not root.is_dir():
        return [str(root)]
    other = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        name, path = entry.name, root / entry.name
        if entry.is_symlink():
            other.append(name)
        elif name == LOCK and entry.is_file(follow_symlinks=False):
            continue
        elif name.startswith(TEMP_PREFIX) or MANIFEST_TEMP.fullmatch(name):
            continue
        elif name in ("backbone", "router") and entry.is_dir(follow_symlinks=False) and _only_versions(path):
            continue
        elif name == "adapters" and entry.is_dir(follow_symlinks=False) and all(
                sub.is_dir(follow_symlinks=False) and _only_versions(path / sub.name) for sub in os.scandir(path)):
            continue
        else:
            other.append(name)
    return other


def _only_versions(folder: Path) -> bool:
    return all(e.is_dir(follow_symlinks=False) and (VERSION_DIR.fullmatch(e.name) or e.name.startswith(TEMP_PREFIX))
               for e in os.scandir(folder))
