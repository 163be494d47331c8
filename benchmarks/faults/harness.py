"""The fault-injection harness: subprocesses of the real CLI, a live `crma serve`, raw HTTP, and the
case/result records (benchmarks/fault_injection.py runs the cases)."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CRMA = [sys.executable, "-m", "crma"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}
FAST = ["--epochs", "1", "--lr", "1e-2", "--batch-size", "8", "--max-len", "48", "--eval-batch-size", "8",
        "--min-gain", "-100"]          # always registered: these cases are about the store, not the gain
TOKEN = "fi-admin-t0ken-7f3a"
SERVE_LIMITS = ["--timeout-keep-alive", "1", "--timeout-headers", "2", "--timeout-body", "2"]


def demo_dir() -> Path:
    """crma's bundled demo data, found without importing crma."""
    spec = util.find_spec("crma")
    if spec is None or spec.origin is None:
        sys.exit("fault_injection: crma is not importable with this interpreter")
    return Path(spec.origin).parent / "demo_data"


DEMO = demo_dir()


def data_arg(domain: str) -> str:
    return f"{DEMO / domain / 'train.jsonl'}:{DEMO / domain / 'holdout.jsonl'}"


def add_args(root: Path, domain: str, data: str | None = None, *extra: str) -> list[str]:
    """`crma add` of `domain` (--data `data`, default the domain's demo data)."""
    return ["add", "--store", str(root), "--domain", domain, "--data", data or data_arg(domain), *FAST, *extra]


def renamed_data(folder: Path, domain: str) -> str:
    """A demo domain's passages as plain {"text"} records (its records name their domain, so they cannot be
    added under another name as they are): a --data value."""
    files = []
    for split in ("train", "holdout"):
        path = folder / f"{domain}-{split}.jsonl"
        records = [json.loads(line) for line in (DEMO / domain / f"{split}.jsonl").read_text().splitlines() if line]
        path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in records))
        files.append(str(path))
    return ":".join(files)


# ---- cases, results, the context a case runs in --------------------------------------------------------------
class NotHeld(Exception):
    """The case's expectation did not hold (the message is the detail)."""


class Skipped(Exception):
    """The case cannot be run here (the message says why)."""


def expect(condition: bool, detail: str) -> None:
    if not condition:
        raise NotHeld(detail)


@dataclass
class Case:
    name: str
    did: str
    expected: str
    func: Callable[[Ctx], str]          # returns the detail when the case held, raises NotHeld otherwise
    timeout: float = 90.0
    group: str = "store"                # "server": uses the one live server; "store"; "fresh": no base store


@dataclass
class Result:
    case: str
    did: str
    expected: str
    held: str                           # yes, no or skipped
    detail: str
    seconds: float


@dataclass
class Done:
    """A finished CLI command."""
    rc: int
    out: str
    err: str
    seconds: float

    def brief(self) -> str:
        """The first error line (or output line), short: for a detail column."""
        lines = [ln.strip() for ln in (self.err or self.out).splitlines()
                 if ln.strip() and "it/s" not in ln and not ln.startswith(("eval ", "train "))]
        return short(lines[-1] if "Traceback" in self.err and lines else (lines[0] if lines else ""))


def short(text: str, n: int = 170) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


class Proc:
    """A crma command started in the background, its output in files under the case folder."""

    def __init__(self, folder: Path, name: str, args: list[str], pause: str | None = None, hide: Path | None = None):
        self.name, self.args, self.hide = name, args, hide
        self.out_path, self.err_path = folder / f"{name}.out", folder / f"{name}.err"
        self.resume_path = folder / f"{name}.go"
        env = dict(ENV)
        if pause:
            env |= {"CRMA_STORE_PAUSE": pause, "CRMA_STORE_RESUME": str(self.resume_path)}
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen([*CRMA, *args], env=env, stdout=out, stderr=err, cwd=folder)
        self.started = time.monotonic()

    def out(self) -> str:
        return self._read(self.out_path)

    def err(self) -> str:
        return self._read(self.err_path)

    def _read(self, path: Path) -> str:
        """What the command wrote, with the script's temp folder shown as $WORK (shorter details)."""
        text = path.read_text(errors="replace")
        return text.replace(str(self.hide), "$WORK") if self.hide else text

    def resume(self) -> None:
        self.resume_path.touch()

    def wait(self, timeout: float) -> Done:
        try:
            rc = self.popen.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            self.kill()
            raise NotHeld(f"`crma {' '.join(self.args[:2])}` still running after {timeout:.0f} s: killed") from None
        return Done(rc, self.out(), self.err(), time.monotonic() - self.started)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(30)


class Ctx:
    """What a case gets: its own temp folder, the base store, the live server, a deadline; every process it
    starts is killed when it ends."""

    def __init__(self, folder: Path, base: Path | None, server: LiveServer | None, timeout: float):
        self.tmp, self.base, self.server = folder, base, server
        self.deadline = time.monotonic() + timeout
        self.procs: list[Proc] = []
        self.servers: list[LiveServer] = []

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise NotHeld("the case ran out of time")
        return left

    def copy_base(self, name: str = "store") -> Path:
        root = self.tmp / name
        shutil.copytree(self.base, root, symlinks=True)
        return root

    def start(self, name: str, args: list[str], pause: str | None = None) -> Proc:
        proc = Proc(self.tmp, name, [str(a) for a in args], pause, hide=self.tmp.parent)
        self.procs.append(proc)
        return proc

    def crma(self, *args, name: str | None = None) -> Done:
        """Run a crma command to its end (within the case's time)."""
        name = name or f"cmd{len(self.procs)}"
        return self.start(name, list(args)).wait(self.left())

    def serve(self, root: Path, *extra: str) -> LiveServer:
        server = LiveServer(self.tmp, root, list(extra))
        self.servers.append(server)
        server.wait_ready(self.left())
        return server

    def wait_output(self, proc: Proc, text: str) -> float:
        """Seconds until `text` is on the process's stdout (NotHeld if it ends first or time runs out)."""
        while text not in proc.out():
            if proc.popen.poll() is not None:
                raise NotHeld(f"{proc.name} exited ({proc.popen.returncode}) before '{text}': "
                              f"{short(proc.err()[-400:])}")
            self.left()
            time.sleep(0.05)
        return time.monotonic() - proc.started

    def cleanup(self) -> None:
        for proc in self.procs:
            proc.kill()
        for server in self.servers:
            server.stop()


# ---- helpers: manifests, snapshots, damage ----------------------------------------------------------------------
def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` (links not followed): a file's size, mtime and sha256, a link's target."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = f"link -> {os.readlink(p)}"
        elif p.is_file():
            st = p.stat()
            out[rel] = f"{st.st_size} {st.st_mtime_ns} {hashlib.sha256(p.read_bytes()).hexdigest()}"
        else:
            out[rel] = "dir"
    return out


def leftovers(root: Path) -> list[str]:
    """crma's temp files and folders (what an interrupted writer leaves and the next writer sweeps)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.startswith(".tmp-") or (p.name.startswith(".manifest.json.") and p.name.endswith(".tmp")))


def flip(path: Path) -> None:
    """Change one byte in the middle of a file (a bad disk, a careless edit)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def backbone_chain(m: dict) -> str | None:
    """None when the modular store's backbone versions form one chain with one version per registered add
    (nothing lost); else what is wrong."""
    versions = m["backbone"]["versions"]
    nums = sorted(int(v) for v in versions)
    adds = [e for e in m["log"] if e.get("op") == "add"]
    if nums != list(range(1, len(nums) + 1)):
        return f"backbone versions {nums} are not 1..n"
    for n in nums:
        parent = versions[str(n)]["parent"]
        if parent != (n - 1 if n > 1 else None):
            return f"backbone v{n} has parent {parent}, expected {n - 1 if n > 1 else None}"
    if len(adds) != len(nums):
        return f"{len(adds)} adds registered but {len(nums)} backbone versions"
    if m["backbone"]["current"] != nums[-1]:
        return f"backbone.current is {m['backbone']['current']}, the newest version is {nums[-1]}"
    for name, dom in m["domains"].items():
        meta = m["adapters"][dom["adapter"]][str(dom["current"])]
        if str(meta["backbone_version"]) not in versions:
            return f"{name} is pinned to backbone v{meta['backbone_version']}, which the manifest lacks"
    return None


def no_traceback(done: Done, what: str) -> None:
    expect("Traceback" not in done.err, f"{what} printed a traceback: {done.brief()}")


# ---- the live server -------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`crma serve` on a free loopback port, its output in files."""

    def __init__(self, folder: Path, root: Path, extra: list[str]):
        self.root, self.port = root, free_port()
        self.host = f"127.0.0.1:{self.port}"
        args = ["serve", "--store", str(root), "--port", str(self.port), "--threads", "1", "--log-level", "warning",
                "--max-batch", "16", "--max-tokens", "64", *SERVE_LIMITS, *extra]
        self.proc = Proc(folder, f"serve-{self.port}", args)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.popen.poll() is not None:
                raise NotHeld(f"crma serve exited ({self.proc.popen.returncode}): {short(self.proc.err()[-600:], 400)}")
            try:
                if self.get("/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise NotHeld(f"crma serve did not answer /health within {timeout:.0f} s")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 60) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def get(self, path: str, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
        return self.request("GET", path, headers=headers, timeout=timeout)

    def post(self, path: str, body, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
        """POST JSON (a dict, or raw bytes as they are); (status, parsed reply or {"raw": text})."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, _, data = self.request("POST", path, raw, {"Content-Type": "application/json", **(headers or {})},
                                       timeout)
        try:
            return status, json.loads(data)
        except ValueError:
            return status, {"raw": data.decode(errors="replace")}

    def health(self, token: str | None = None) -> dict:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return json.loads(self.get("/health", headers)[2])

    def stream_chat(self, prompt: str, max_tokens: int, **params) -> tuple[int, str, str | None, bool]:
        """A streamed chat completion: (status, text, finish_reason, whether [DONE] arrived)."""
        body = json.dumps({"model": params.pop("model", "cooking"), "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": max_tokens, "stream": True, **params}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                return resp.status, resp.read().decode(errors="replace"), None, False
            text, finish, done = "", None, False
            for line in resp:
                line = line.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                choice = json.loads(data)["choices"][0]
                text += choice.get("delta", {}).get("content") or ""
                finish = choice.get("finish_reason") or finish
            return 200, text, finish, done
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.popen.poll() is None:
            self.proc.popen.send_signal(signal.SIGINT)
            try:
                self.proc.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def raw_exchange(port: int, head: bytes, chunks, timeout: float = 20) -> tuple[int | None, bytes]:
    """Send `head` then `chunks` on a fresh connection (in a thread: the server may answer, and close,
    before it read them all) and read the reply: (status or None, what came back)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send():
        try:
            sock.sendall(head)
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:
            pass                            # the server answered and closed early: what the case wants to see
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    got = b""
    try:
        while b"\r\n\r\n" not in got or len(got) < _reply_length(got):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    finally:
        sock.close()
    status = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/1.1 ") else None
    return status, got


def _reply_length(got: bytes) -> int:
    head, _, _ = got.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + 4 + int(value)
    return 1 << 60                          # no length: read until closed


def error_of(reply: dict) -> tuple[str | None, str]:
    err = reply.get("error") or {}
    return err.get("param"), short(err.get("message") or reply.get("raw", ""), 110)


# ---- server cases ----------------------------------------------------------------------------------------------
