"""`crma` commands in a forked child of the test process.

The child is a real second process: its own pid, its own store lock, killed by a real SIGKILL. It starts
from the test process's memory, so it skips the ~6 s a fresh `python -m crma` spends importing torch,
transformers and peft. Tests that check the command line itself (`crma serve`, `accelerate launch`)
still start a fresh interpreter.
"""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path

from crma.cli import main


class Crma:
    """`crma ARGS` with `env` added to the environment, stdout and stderr written to `out` and `err`:
    poll / wait / send_signal / kill as subprocess.Popen has them."""

    running: set[Crma] = set()                              # killed by kill_running() after every test

    def __init__(self, args: list[str], out: Path, err: Path, env: dict[str, str] | None = None):
        self.args, self.out, self.err = list(args), Path(out), Path(err)
        self.returncode: int | None = None
        for path in (self.out, self.err):                   # there before the test reads them
            path.write_bytes(b"")
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:                                   # the child never returns to pytest
            os._exit(self._child(env or {}))
        Crma.running.add(self)

    def _child(self, env: dict[str, str]) -> int:
        code = 1
        try:
            for fd, path in ((1, self.out), (2, self.err)):
                target = os.open(path, os.O_WRONLY | os.O_APPEND)
                os.dup2(target, fd)
                os.close(target)
            sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
            sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.environ.update(env)
            code = main(self.args)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        return code

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                Crma.running.discard(self)
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"crma {' '.join(self.args)} still running after {timeout} s")
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def output(self) -> tuple[str, str]:
        return (self.out.read_text(errors="replace"), self.err.read_text(errors="replace"))

    def wait_for(self, text: str, stream: int = 0, timeout: float = 120) -> None:
        """Until `text` is in the child's stdout (stream 0) or stderr (1); fails with the end of its stderr
        when the child ends first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while text not in self.output()[stream]:
            assert self.poll() is None and time.monotonic() < deadline, \
                (self.args, text, self.poll(), self.output()[1][-2000:])
            time.sleep(0.05)


def kill_running() -> None:
    """SIGKILL and reap every child a test left running (a failed assertion before its kill)."""
    for proc in list(Crma.running):
        proc.kill()
        proc.wait(timeout=30)
