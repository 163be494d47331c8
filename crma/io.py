"""Atomic writes: write to a temp file beside the target, then rename. Nothing half-written is left.
A process killed mid-write leaves only its temp file, named `.<target name>.<random>.tmp` (`temp_pattern`
matches exactly those, so a later writer can sweep them and nothing else)."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path


def command_line(argv: list[str] | None = None) -> str:
    """The command recorded beside every result: `crma ARGS` from the CLI, else the Python invocation."""
    if argv is not None:
        return shlex.join(["crma", *argv])
    return shlex.join(["python", *sys.argv])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def record_write(path: Path) -> None:
    """Test hook: with CRMA_WRITE_LOG=<file>, every finished atomic write appends "<pid> <path>" there,
    so a multi-process test can check that exactly one process wrote each file."""
    log = os.environ.get("CRMA_WRITE_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:        # O_APPEND: whole lines, even from several processes
            f.write(f"{os.getpid()} {Path(path).resolve()}\n")


TEMP_SUFFIX = ".tmp"


def temp_pattern(name: str) -> re.Pattern:
    """The names of atomic_path's temp files for a target called `name` (mkstemp: 8 of [a-z0-9_])."""
    return re.compile(re.escape(f".{name}.") + r"[A-Za-z0-9_]{6,16}" + re.escape(TEMP_SUFFIX))


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path in the target's folder; on success rename it over `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())          # mkstemp makes 0600; give the file normal permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
        record_write(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temp folder beside `path`; on success it replaces `path` (old content removed last)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        record_write(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, obj) -> Path:
    """Atomically write `obj` as indented JSON."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file (UTF-8)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
