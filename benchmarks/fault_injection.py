"""Fault injection: replay hostile and careless use against crma on tiny stores, loopback only.

    OMP_NUM_THREADS=1 python benchmarks/fault_injection.py [--out DIR] [--only SUBSTR] [--keep] [--jobs N]

Every case drives the real CLI (`crma add`, `crma store ...`, `crma eval`, `crma generate`, `crma serve`) in
subprocesses, and the server over HTTP on 127.0.0.1 (standard library only: http.client and sockets). One
tiny base store (tiny:llama, modular: cooking then astronomy, the bundled demo data) is made at the start;
a case that changes a store works on a copy of it. Each case has a timeout; its processes are killed when
it ends. The script prints a table (case | what was done | expected | held | detail) and writes
DIR/fault_injection.json and DIR/fault_injection.md (each a temp file, then os.replace). Exit status 0
only when every case that ran held; a case that cannot be run here (e.g. a read-only store when running
as root, whose writes chmod does not stop) is reported as skipped, with the reason.

Concurrent writers are raced deterministically with crma's test hook (CRMA_STORE_PAUSE=<point> with
CRMA_STORE_RESUME=<file>: a writer announces the point on stdout and waits there), the same hook kills a
writer at an exact moment of its registration. The crma tested is the one this interpreter imports (the
repository's, installed editable; to test a commit: `git archive C crma | tar -x -C D` and PYTHONPATH=D).
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata, util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
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
def case_streams_and_tiny_temperature(ctx: Ctx) -> str:
    srv = ctx.server
    errors_before = srv.health()["stats"]["errors"]
    prompts = ["Knead the dough", "The stars", "abc", "Bake at", "Planets orbit", "xyz", "Salt and", "Comets"]
    models = ["cooking", "astronomy", "auto", "base"]
    barrier = threading.Barrier(len(prompts) + 1)
    results: dict[int, object] = {}

    def stream(k: int) -> None:
        barrier.wait(30)
        try:
            results[k] = srv.stream_chat(prompts[k], 12 + k, model=models[k % 4], temperature=0.8, seed=k)
        except Exception as err:            # noqa: BLE001 -- recorded as this stream's outcome
            results[k] = f"{type(err).__name__}: {err}"

    def hostile() -> None:
        barrier.wait(30)
        try:
            results["hostile"] = srv.post("/v1/completions", {"model": "cooking", "prompt": "Knead the dough",
                                                              "max_tokens": 12, "temperature": 1.5e-39})
        except Exception as err:            # noqa: BLE001
            results["hostile"] = f"{type(err).__name__}: {err}"
    threads = [threading.Thread(target=stream, args=(k,)) for k in range(len(prompts))]
    threads.append(threading.Thread(target=hostile))
    for t in threads:
        t.start()
    for t in threads:
        t.join(ctx.left())
    bad = {k: v for k, v in results.items() if k != "hostile" and not (
        isinstance(v, tuple) and v[0] == 200 and v[2] in ("length", "stop") and v[3])}
    expect(len(results) == len(prompts) + 1, f"only {len(results)} of {len(prompts) + 1} requests returned")
    expect(not bad, f"streams that did not complete: {short(str(bad), 300)}")
    hostile_reply = results["hostile"]
    expect(isinstance(hostile_reply, tuple), f"hostile request failed: {hostile_reply}")
    status, reply = hostile_reply
    expect(status in (200, 400), f"temperature 1.5e-39 got {status}: {short(str(reply))}")
    errors = srv.health()["stats"]["errors"] - errors_before
    expect(errors == 0, f"the server counted {errors} failed requests")
    how = (f"200, finish {reply['choices'][0]['finish_reason']} (greedy)" if status == 200
           else f"400 ({error_of(reply)[1]})")
    return f"8/8 streams ended with finish_reason and [DONE]; temperature 1.5e-39 -> {how}; 0 server errors"


def bad_value(ctx: Ctx, param: str, raw: bytes) -> str:
    body = b'{"model": "cooking", "prompt": "abc", "max_tokens": 3, "%s": %s}' % (param.encode(), raw)
    status, reply = ctx.server.post("/v1/completions", body)
    named, message = error_of(reply)
    expect(status == 400 and named == param, f"status {status}, error.param {named!r}: {message}")
    return f"400, error.param={named!r}: {message}"


def case_temperature_string(ctx: Ctx) -> str:
    return bad_value(ctx, "temperature", b'"4"')


def case_temperature_bool(ctx: Ctx) -> str:
    return bad_value(ctx, "temperature", b"true")


def case_temperature_nan(ctx: Ctx) -> str:
    return bad_value(ctx, "temperature", b"NaN")


def case_lone_surrogate(ctx: Ctx) -> str:
    status, reply = ctx.server.post("/v1/chat/completions",
                                    b'{"model": "cooking", "messages": [{"role": "user", "content": "hi \\ud800"}]}')
    named, message = error_of(reply)
    expect(status == 400, f"status {status}: {message}")
    status2, reply2 = ctx.server.post("/v1/completions", b'{"model": "cooking", "prompt": "abc\\ud800"}')
    expect(status2 == 400, f"prompt with a lone surrogate: status {status2}: {error_of(reply2)[1]}")
    return f"400 twice, error.param={named!r} and {error_of(reply2)[0]!r}: {message}"


def case_body_2mb(ctx: Ctx) -> str:
    body = b'{"model": "cooking", "prompt": "' + b"a" * 2_000_000 + b'"}'
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    status, got = raw_exchange(ctx.server.port, head, [body[k:k + 65536] for k in range(0, len(body), 65536)])
    expect(status == 413, f"declared 2 MB body: got {status}: {short(got[:200].decode(errors='replace'))}")
    chunked = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
    pieces = [b"%x\r\n%s\r\n" % (65536, body[k:k + 65536]) for k in range(0, 2_031_616, 65536)] + [b"0\r\n\r\n"]
    status2, got2 = raw_exchange(ctx.server.port, chunked, pieces)
    expect(status2 == 413, f"chunked 2 MB body (no Content-Length): got {status2}: "
                           f"{short(got2[:200].decode(errors='replace'))}")
    expect(ctx.server.get("/health")[0] == 200, "the server stopped answering")
    return "413 with Content-Length: 2000034, 413 sent chunked without a length; server still answers"


def case_evil_host(ctx: Ctx) -> str:
    got = {}
    for host in ("evil.example", f"evil.example:{ctx.server.port}", "127.0.0.1.evil.example"):
        got[host] = ctx.server.get("/v1/models", {"Host": host})[0]
    control = ctx.server.get("/v1/models", {"Host": ctx.server.host})[0]
    expect(all(s in (400, 403, 421) for s in got.values()), f"Host headers answered: {got}")
    expect(control == 200, f"Host {ctx.server.host} itself got {control}")
    return f"{', '.join(f'{h}: {s}' for h, s in got.items())}; Host {ctx.server.host}: 200"


def case_cross_origin(ctx: Ctx) -> str:
    body = json.dumps({"model": "cooking", "prompt": "abc", "max_tokens": 2}).encode()
    prefills = ctx.server.health()["stats"]["prefills"]
    page, _, page_reply = ctx.server.request("POST", "/v1/completions", body,
                                             {"Content-Type": "text/plain", "Origin": "http://evil.example"})
    form, _, _ = ctx.server.request("POST", "/v1/completions", body, {"Content-Type": "text/plain"})
    preflight, _, _ = ctx.server.request("OPTIONS", "/v1/completions", None,
                                         {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    ran = ctx.server.health()["stats"]["prefills"] - prefills
    expect(page in (403, 415), f"text/plain POST from http://evil.example got {page}: {page_reply[:160]!r}")
    expect(form in (403, 415), f"text/plain POST without Origin got {form}")
    expect(preflight in (403, 405), f"CORS preflight got {preflight}")
    expect(ran == 0, f"{ran} completions ran")
    own, _ = ctx.server.post("/v1/completions", body, {"Origin": f"http://{ctx.server.host}"})
    expect(own == 200, f"a same-origin JSON POST got {own}")
    return f"evil origin text/plain: {page}; no Origin text/plain: {form}; preflight: {preflight}; 0 prefills ran"


def case_health_no_paths(ctx: Ctx) -> str:
    status, _, raw = ctx.server.get("/health")
    text = raw.decode()
    expect(status == 200, f"/health got {status}")
    leaks = [s for s in (str(ctx.server.root), str(ctx.server.root.parent), "manifest.json", "/") if s in text]
    expect(not leaks, f"public /health contains {leaks}: {short(text, 200)}")
    full = ctx.server.health(TOKEN)
    expect(full.get("store") == str(ctx.server.root), "with the admin token /health does not show the store")
    return f"200, keys {sorted(json.loads(text))[:6]}..., no '/' in it; the admin token's /health shows the store"


def case_idle_connections(ctx: Ctx) -> str:
    port, conns, t0 = ctx.server.port, [], time.monotonic()
    try:
        for _ in range(150):
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        statuses, first = [], None
        while True:                         # a normal client: retries a 503 as its Retry-After says
            try:
                status, reply = ctx.server.post("/v1/completions", {"model": "cooking", "prompt": "abc",
                                                                    "max_tokens": 2, "temperature": 0}, timeout=10)
            except OSError as err:
                status, reply = type(err).__name__, {}
            statuses.append(status)
            first = first or reply
            if status == 200 or time.monotonic() - t0 > 10:
                break
            time.sleep(0.5)
        ok_after = time.monotonic() - t0
        expect(status == 200, f"no answer within 10 s: {statuses}")
        expect(ok_after < 6, f"the request succeeded only after {ok_after:.1f} s ({statuses})")
        open_after, closed_at = [], []
        for conn in conns:                  # each must be closed by the server (timeout-headers 2 s)
            conn.settimeout(max(0.1, 8 - (time.monotonic() - t0)))
            try:
                while conn.recv(4096):
                    pass
                closed_at.append(time.monotonic() - t0)
            except ConnectionResetError:
                closed_at.append(time.monotonic() - t0)
            except TimeoutError:
                open_after.append(conn)
        expect(not open_after, f"{len(open_after)} of 150 idle connections still open after 8 s")
    finally:
        for conn in conns:
            conn.close()
    retried = f"first {statuses[0]} ({error_of(first)[1]}), " if statuses[0] != 200 else ""
    return (f"{retried}200 after {ok_after:.1f} s ({len(statuses)} tries); all 150 idle connections closed by the "
            f"server within {max(closed_at):.1f} s")


def case_half_request(ctx: Ctx) -> str:
    with socket.create_connection(("127.0.0.1", ctx.server.port), timeout=10) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
        t, got = time.monotonic(), b""
        try:
            while chunk := conn.recv(4096):
                got += chunk
        except TimeoutError:
            raise NotHeld(f"still open after 10 s (got {got[:60]!r})") from None
        except ConnectionResetError:
            pass
        waited = time.monotonic() - t
    expect(got.startswith(b"HTTP/1.1 408"), f"got {got[:80]!r} after {waited:.1f} s")
    return f"408 and closed after {waited:.1f} s"


def case_token_not_in_ps(ctx: Ctx) -> str:
    pid = ctx.server.proc.popen.pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    expect(TOKEN not in cmdline, f"the token is in /proc/{pid}/cmdline: {short(cmdline)}")
    ps = shutil.which("ps")
    listing = subprocess.run([ps, "-eo", "pid,args"], capture_output=True, text=True).stdout if ps else ""
    expect(TOKEN not in listing, "the token is in `ps -eo pid,args`")
    status, _ = ctx.server.post("/admin/reload", {}, {"Authorization": f"Bearer {TOKEN}"})
    wrong, _ = ctx.server.post("/admin/reload", {}, {"Authorization": "Bearer wrong"})
    expect(status == 200 and wrong == 401, f"/admin/reload with the token: {status}, with a wrong one: {wrong}")
    return (f"not in /proc/{pid}/cmdline{' nor ps -eo args' if ps else ''}; /admin/reload: 200 with the token from "
            f"the file, 401 with a wrong one")


# ---- store cases: concurrent writers ---------------------------------------------------------------------------
def race(ctx: Ctx, first: list[str], second: list[str]) -> tuple[Done, Done]:
    """Two adds train at once and wait just before taking the store lock; then the first registers, and
    after it the second tries (the closest race, made deterministic)."""
    a, b = ctx.start("first", first, pause="before-lock"), ctx.start("second", second, pause="before-lock")
    ctx.wait_output(a, "CRMA_STORE_PAUSED before-lock")
    ctx.wait_output(b, "CRMA_STORE_PAUSED before-lock")
    a.resume()
    done_a = a.wait(ctx.left())
    b.resume()
    return done_a, b.wait(ctx.left())


def serves_after(ctx: Ctx, root: Path, domain: str) -> str:
    verify = ctx.crma("store", "verify", str(root), name="verify")
    expect(verify.rc == 0, f"crma store verify: exit {verify.rc}: {verify.brief()}")
    gen = ctx.crma("generate", "--store", str(root), "--domain", domain, "--max-new-tokens", "4", "--temperature", "0",
                   "Knead the dough", name="generate")
    expect(gen.rc == 0 and gen.out.strip(), f"crma generate: exit {gen.rc}: {gen.brief()}")
    return "store verify 0, generate answers"


def first_add_race(ctx: Ctx, option: str, first_value: str, second_value: str) -> str:
    root = ctx.tmp / "store"
    root.mkdir()
    new = ["--model", "tiny:llama"] if option == "--condition" else []
    first, second = race(ctx, add_args(root, "cooking", None, *new, option, first_value),
                         add_args(root, "astronomy", None, *new, option, second_value))
    expect(first.rc == 0, f"the first add failed ({first.rc}): {first.brief()}")
    no_traceback(second, "the second add")
    expect(second.rc == 2 and "meanwhile" in second.err, f"the second add: exit {second.rc}: {second.brief()}")
    expect(first_value in second.err and second_value in second.err, f"the refusal names neither value: "
                                                                      f"{second.brief()}")
    m = manifest(root)
    have = m["model"]["spec"] if option == "--model" else m["condition"]
    expect(have == first_value and list(m["domains"]) == ["cooking"], f"manifest: {have}, {list(m['domains'])}")
    expect(sorted(os.listdir(root / "adapters")) == ["cooking"], f"adapters/: {os.listdir(root / 'adapters')}")
    return f"first 0, second 2: \"{second.brief()}\"; {serves_after(ctx, root, 'cooking')}"


def case_race_models(ctx: Ctx) -> str:
    return first_add_race(ctx, "--model", "tiny:llama", "tiny:gpt2")


def case_race_conditions(ctx: Ctx) -> str:
    return first_add_race(ctx, "--condition", "modular", "frozen")


def case_race_domains(ctx: Ctx) -> str:
    root = ctx.copy_base()
    first, second = race(ctx, add_args(root, "contracts"), add_args(root, "baking", renamed_data(ctx.tmp, "cooking")))
    expect(first.rc == 0, f"the first add failed ({first.rc}): {first.brief()}")
    no_traceback(second, "the second add")
    expect(second.rc in (0, 2), f"the second add: exit {second.rc}: {second.brief()}")
    m = manifest(root)
    problem = backbone_chain(m)
    expect(problem is None, f"backbone chain: {problem}")
    expect(("baking" in m["domains"]) == (second.rc == 0), f"second exit {second.rc} but domains {list(m['domains'])}")
    verify = ctx.crma("store", "verify", str(root), name="verify")
    expect(verify.rc == 0, f"crma store verify: exit {verify.rc}: {verify.brief()}")
    outcome = "registered on top" if second.rc == 0 else f"refused: \"{second.brief()}\""
    versions = ", ".join(f"v{k}<-{v['parent']}" for k, v in m["backbone"]["versions"].items())
    return f"first 0, second {outcome}; backbone chain {versions} consistent; store verify 0"


# ---- store cases: links and user files inside the store ----------------------------------------------------
def outside_folder(ctx: Ctx) -> Path:
    """A user's folder outside the store with names a careless sweep would take for crma's."""
    folder = ctx.tmp / "outside"
    for rel, text in (("v1/adapter_model.safetensors", "weights"), ("v2/meta.json", "{}"), ("videos/a.mp4", "film"),
                      (".tmp-keep/notes", "keep"), ("readme.txt", "mine")):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


def case_linked_adapter_folder(ctx: Ctx) -> str:
    root, outside = ctx.copy_base(), outside_folder(ctx)
    (root / "adapters" / "x").symlink_to(outside)
    before, m_before = snapshot(outside), (root / "manifest.json").read_bytes()
    got = []
    for name, args in (("rollback", ["store", "rollback", str(root), "cooking"]),
                       ("add", add_args(root, "x", renamed_data(ctx.tmp, "cooking")))):
        done = ctx.crma(*args, name=name)
        no_traceback(done, f"crma {name}")
        expect(done.rc == 2 and "symbolic link" in done.err, f"crma {name}: exit {done.rc}: {done.brief()}")
        got.append(f"{name} 2")
    expect(snapshot(outside) == before, "the outside folder changed")
    expect((root / "manifest.json").read_bytes() == m_before, "the manifest changed")
    return f"{', '.join(got)}: \"{done.brief()}\"; outside folder and manifest unchanged"


def case_linked_registered_domain(ctx: Ctx) -> str:
    root, outside = ctx.copy_base(), ctx.tmp / "outside-cooking"
    shutil.copytree(root / "adapters" / "cooking", outside)        # the real files, so hashes still match
    (outside / "v7").mkdir()
    (outside / "v7" / "meta.json").write_text('{"mine": true}')   # looks like an unreferenced crma version
    shutil.rmtree(root / "adapters" / "cooking")
    (root / "adapters" / "cooking").symlink_to(outside)
    before = snapshot(outside)
    done = ctx.crma("store", "remove", str(root), "astronomy", name="remove")   # a writer: it sweeps
    no_traceback(done, "crma store remove")
    expect(snapshot(outside) == before, f"the outside folder changed (remove exit {done.rc})")
    return f"store remove astronomy: exit {done.rc}: \"{done.brief()}\"; outside folder (with v7/) unchanged"


def case_linked_lock(ctx: Ctx) -> str:
    root, secret, missing = ctx.copy_base(), ctx.tmp / "secret.txt", ctx.tmp / "created-by-nobody"
    secret.write_text("precious")
    before = (secret.read_bytes(), secret.stat().st_mtime_ns)
    (root / ".lock").unlink(missing_ok=True)
    (root / ".lock").symlink_to(secret)
    done = ctx.crma("store", "remove", str(root), "astronomy", name="remove")
    no_traceback(done, "crma store remove")
    expect(done.rc == 2 and "symbolic link" in done.err, f"exit {done.rc}: {done.brief()}")
    expect((secret.read_bytes(), secret.stat().st_mtime_ns) == before, "the outside file changed")
    (root / ".lock").unlink()
    (root / ".lock").symlink_to(missing)
    dangling = ctx.crma("store", "remove", str(root), "astronomy", name="remove-dangling")
    expect(dangling.rc == 2 and not missing.exists(), f"dangling link: exit {dangling.rc}, "
                                                      f"target created: {missing.exists()}")
    return f"exit 2: \"{done.brief()}\"; outside file unchanged; a dangling .lock link: exit 2, nothing created"


def case_sweep_spares_user_files(ctx: Ctx) -> str:
    root = ctx.copy_base()
    user = ["vault/keep.txt", "v2.bak/keep.txt", "backbone/vault/keep.txt", "backbone/v2.bak/keep.txt",
            "adapters/cooking/v1.old/keep.txt", "router/videos/keep.txt", "notes.txt"]
    own = ["backbone/v7/crma_backbone.safetensors", ".tmp-abc123/x", "adapters/cooking/.tmp-q1w2e3/x"]
    for rel in user + own:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    done = ctx.crma("store", "remove", str(root), "astronomy", name="remove")
    expect(done.rc == 0, f"crma store remove: exit {done.rc}: {done.brief()}")
    lost = [rel for rel in user if not (root / rel).is_file() or (root / rel).read_text() != "x"]
    expect(not lost, f"user files lost: {lost}")
    kept = [rel for rel in own if (root / rel).exists()]
    expect(not kept, f"crma's leftovers not swept: {kept}")
    return f"{len(user)} user files/folders kept (vault/, v2.bak/, ...); {len(own)} crma leftovers swept"


# ---- store cases: writers killed --------------------------------------------------------------------------------
def killed_add(ctx: Ctx, root: Path, at: str) -> str:
    """SIGKILL `crma add contracts` at `at` (seconds, 'training', or a hook point); then the store must
    verify and the next add must register."""
    before = (root / "manifest.json").read_bytes()
    pause = at if not at[0].isdigit() and at != "training" else None
    proc = ctx.start("killed", add_args(root, "contracts"), pause=pause)
    if pause:
        when = ctx.wait_output(proc, f"CRMA_STORE_PAUSED {pause}")
    elif at == "training":
        when = ctx.wait_output(proc, "crma add:") + 0.5
        time.sleep(0.5)
    else:
        time.sleep(float(at))
        when = float(at)
    expect(proc.popen.poll() is None, f"the add ended before it was killed: {proc.popen.returncode}")
    proc.kill()
    left = leftovers(root)
    expect((root / "manifest.json").read_bytes() == before, "the manifest changed")
    verify = ctx.crma("store", "verify", str(root), name="verify")
    expect(verify.rc == 0, f"crma store verify: exit {verify.rc}: {verify.brief()}")
    again = ctx.crma(*add_args(root, "contracts"), name="again")
    expect(again.rc == 0, f"the next add: exit {again.rc}: {again.brief()}")
    expect("contracts" in manifest(root)["domains"] and not leftovers(root), f"after the next add: leftovers "
                                                                            f"{leftovers(root)}")
    return (f"killed after {when:.1f} s; manifest unchanged; {len(left)} temp leftovers; verify 0; next add "
            f"registered contracts and swept them")


def case_kill_after_3s(ctx: Ctx) -> str:
    return killed_add(ctx, ctx.copy_base(), "3")


def case_kill_in_training(ctx: Ctx) -> str:
    return killed_add(ctx, ctx.copy_base(), "training")


def case_kill_before_version_rename(ctx: Ctx) -> str:
    return killed_add(ctx, ctx.copy_base(), "before-version-rename")


def case_kill_before_manifest_rename(ctx: Ctx) -> str:
    return killed_add(ctx, ctx.copy_base(), "before-manifest-rename")


def case_first_add_interrupted(ctx: Ctx) -> str:
    root = ctx.tmp / "store"
    args = add_args(root, "cooking", None, "--model", "tiny:llama")
    proc = ctx.start("killed", args, pause="before-manifest-rename")
    ctx.wait_output(proc, "CRMA_STORE_PAUSED before-manifest-rename")
    proc.kill()
    expect(not (root / "manifest.json").exists(), "a manifest.json exists after the kill")
    half = sorted(os.listdir(root))
    again = ctx.crma(*args, name="again")
    expect(again.rc == 0, f"the next add: exit {again.rc}: {again.brief()}")
    verify = ctx.crma("store", "verify", str(root), name="verify")
    expect(verify.rc == 0, f"crma store verify: exit {verify.rc}: {verify.brief()}")
    expect(not leftovers(root), f"leftovers: {leftovers(root)}")
    return f"killed before the manifest existed (folder held {half}); next add took the folder over; verify 0"


# ---- store cases: damage ---------------------------------------------------------------------------------------
def damaged_copy(ctx: Ctx) -> Path:
    root = ctx.copy_base()
    flip(root / "adapters" / "cooking" / "v1" / "adapter_model.safetensors")
    return root


def case_damaged_adapter_serve(ctx: Ctx) -> str:
    root = damaged_copy(ctx)
    srv = ctx.serve(root)
    health = srv.health()
    expect(health["status"] == "degraded" and list(health["unavailable"]) == ["cooking"],
           f"/health: status {health['status']}, unavailable {list(health['unavailable'])}")
    expect(str(root) not in json.dumps(health), "public /health shows the store path")
    models = [m["id"] for m in json.loads(srv.get("/v1/models")[2])["data"]]
    expect("cooking" not in models and "astronomy" in models, f"/v1/models: {models}")
    cooking, reply = srv.post("/v1/completions", {"model": "cooking", "prompt": "abc", "max_tokens": 2})
    expect(cooking in (404, 503), f"cooking got {cooking}")
    answers = {}
    for model in ("astronomy", "base"):
        status, r = srv.post("/v1/completions", {"model": model, "prompt": "The stars", "max_tokens": 3,
                                                 "temperature": 0})
        answers[model] = status
        expect(status == 200 and r["choices"][0]["text"], f"{model} got {status}")
    return (f"serve started; /health degraded, unavailable [cooking]; cooking -> {cooking} "
            f"({error_of(reply)[1][:60]}); astronomy, base -> 200; models {models}")


def case_damaged_adapter_verify_repair(ctx: Ctx) -> str:
    root = damaged_copy(ctx)
    verify = ctx.crma("store", "verify", str(root), name="verify")
    no_traceback(verify, "crma store verify")
    expect(verify.rc == 1 and "cooking" in verify.out and "sha256 mismatch" in verify.out,
           f"verify: exit {verify.rc}: {verify.brief()}")
    m = manifest(root)
    router = m["router"]["versions"][str(m["router"]["current"])]
    flip(root / next(f for f in router["files"] if f.endswith(".safetensors")))   # and a part it can rebuild
    repair = ctx.crma("store", "verify", str(root), "--repair", name="repair")
    no_traceback(repair, "crma store verify --repair")
    rebuilt = manifest(root)["router"]["current"]
    expect("rebuilt" in repair.out and rebuilt == m["router"]["current"] + 1,
           f"--repair: exit {repair.rc}, router v{rebuilt}: {short(repair.out, 300)}")
    expect("cooking" in repair.out and repair.rc == 1, f"--repair: exit {repair.rc}: {short(repair.out, 300)}")
    told = next((ln for ln in repair.out.splitlines() if ln.startswith("repair: cooking")), "")
    return (f"verify 1 names cooking (sha256 mismatch); --repair (router flipped too) rebuilt router v{rebuilt}, "
            f"exit 1: \"...{short(told[-90:], 95)}\"")


def case_damaged_adapter_eval(ctx: Ctx) -> str:
    root = damaged_copy(ctx)
    done = ctx.crma("eval", "--store", str(root), "--data", *[f"{d}={DEMO / d / 'holdout.jsonl'}"
                                                              for d in ("cooking", "astronomy")], name="eval")
    no_traceback(done, "crma eval")
    rows = {ln.split()[0]: ln for ln in done.out.splitlines() if ln.startswith(("cooking ", "astronomy "))}
    expect(done.rc == 1, f"crma eval: exit {done.rc}: {done.brief()}")
    expect("damaged" in rows.get("cooking", "") and "astronomy" in rows, f"rows: {rows}")
    loss = rows["astronomy"].split()[3]
    expect(loss.replace(".", "").isdigit(), f"astronomy row has no loss: {rows['astronomy']}")
    return f"exit 1; cooking row says damaged; astronomy evaluated (pinned loss {loss})"


def case_manifest_missing_key(ctx: Ctx) -> str:
    root = ctx.copy_base()
    m = manifest(root)
    del m["domains"]["cooking"]["current"]
    (root / "manifest.json").write_text(json.dumps(m))
    got = []
    for name, args in (("store list", ["store", "list", str(root)]), ("add", add_args(root, "contracts"))):
        done = ctx.crma(*args, name=name.replace(" ", "-"))
        no_traceback(done, f"crma {name}")
        expect(done.rc == 2 and "domains.cooking.current" in done.err, f"crma {name}: exit {done.rc}: {done.brief()}")
        expect("crma add:" not in done.out, "the add started training")
        got.append(f"{name} 2")
    return f"{', '.join(got)}: \"{done.brief()}\""


def case_manifest_truncated(ctx: Ctx) -> str:
    root = ctx.copy_base()
    text = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text(text[: len(text) // 2])
    show = ctx.crma("store", "show", str(root), name="show")
    no_traceback(show, "crma store show")
    expect(show.rc == 2 and "manifest.json" in show.err, f"crma store show: exit {show.rc}: {show.brief()}")
    srv = LiveServer(ctx.tmp, root, [])
    ctx.servers.append(srv)
    served = srv.proc.wait(min(ctx.left(), 60))
    no_traceback(served, "crma serve")
    expect(served.rc != 0 and "manifest.json" in served.err, f"crma serve: exit {served.rc}: {served.brief()}")
    return f"store show 2: \"{show.brief()}\"; serve refused to start (exit {served.rc}), no traceback"


def case_read_only_store(ctx: Ctx) -> str:
    if os.geteuid() == 0:
        raise Skipped("running as root: chmod -R a-w does not stop root's writes (and this interpreter, under "
                      "/root, cannot run as another user)")
    root = ctx.copy_base()
    subprocess.run(["chmod", "-R", "a-w", str(root)], check=True)
    try:
        show = ctx.crma("store", "show", str(root), name="show")
        expect(show.rc == 0, f"crma store show: exit {show.rc}: {show.brief()}")
        done = ctx.crma("eval", "--store", str(root), "--data", f"cooking={DEMO / 'cooking' / 'holdout.jsonl'}",
                        name="eval")
        expect(done.rc == 0, f"crma eval: exit {done.rc}: {done.brief()}")
        add = ctx.crma(*add_args(root, "contracts"), name="add")
        no_traceback(add, "crma add")
        expect(add.rc == 2 and "crma add:" not in add.out, f"crma add: exit {add.rc}: {add.brief()}")
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(root)], check=False)
    return f"show 0, eval 0; add 2 before training: \"{add.brief()}\""


CASES = [
    Case("serve/8-streams+tiny-temperature", "8 streamed chats (4 models) and one completion at temperature 1.5e-39,"
         " released together", "all 8 complete; the hostile one 200 (greedy) or 400, never 500",
         case_streams_and_tiny_temperature, 120, "server"),
    Case("serve/temperature-string", 'completion with "temperature": "4"', "400 naming temperature",
         case_temperature_string, 30, "server"),
    Case("serve/temperature-bool", 'completion with "temperature": true', "400 naming temperature",
         case_temperature_bool, 30, "server"),
    Case("serve/temperature-nan", 'completion with "temperature": NaN (a JSON extension)', "400 naming temperature",
         case_temperature_nan, 30, "server"),
    Case("serve/lone-surrogate", 'chat content "hi \\ud800", prompt "abc\\ud800"', "400 (no 500, no crash)",
         case_lone_surrogate, 30, "server"),
    Case("serve/2mb-body", "2 MB JSON body, once with Content-Length, once chunked", "413 both times",
         case_body_2mb, 60, "server"),
    Case("serve/evil-host", "GET /v1/models with Host: evil.example (3 spellings)", "refused (400/403/421)",
         case_evil_host, 30, "server"),
    Case("serve/cross-origin", "POST text/plain with Origin: http://evil.example; without Origin; a CORS preflight",
         "refused, no completion run", case_cross_origin, 30, "server"),
    Case("serve/health-no-paths", "GET /health without the admin token", "no filesystem path in it",
         case_health_no_paths, 30, "server"),
    Case("serve/150-idle-connections", "150 connections opened and left silent, then a normal request",
         "request succeeds within a few s; idle ones closed after the timeout (2 s)", case_idle_connections, 60,
         "server"),
    Case("serve/half-request", "half a request line sent, then silence", "408 and closed after ~2 s",
         case_half_request, 30, "server"),
    Case("serve/admin-token-in-ps", "server started with --admin-token-file", "token not in /proc/PID/cmdline or ps",
         case_token_not_in_ps, 30, "server"),
    Case("store/race-first-add-models", "two first adds on an empty folder, --model tiny:llama vs tiny:gpt2, "
         "both trained, then registering one after the other", "one registers, the other refused clearly; verify 0,"
         " generate works", case_race_models, 150, "fresh"),
    Case("store/race-first-add-conditions", "the same with --condition modular vs frozen",
         "one registers, the other refused clearly; verify 0, generate works", case_race_conditions, 150, "fresh"),
    Case("store/race-two-domains", "two adds (contracts, baking) on one modular store, both trained from v2",
         "no lost backbone: chain consistent, second refused or on top; verify 0", case_race_domains, 150),
    Case("store/linked-adapter-folder", "adapters/x -> a folder outside with v1/, v2/, .tmp-keep/; rollback, add x",
         "both refused; outside untouched", case_linked_adapter_folder, 90),
    Case("store/linked-registered-domain", "adapters/cooking replaced by a link to an outside copy holding a v7/; "
         "a writer (store remove astronomy) sweeps", "outside untouched", case_linked_registered_domain, 60),
    Case("store/linked-lock", ".lock -> an outside file (then a dangling link); store remove",
         "refused; outside file unchanged, nothing created", case_linked_lock, 60),
    Case("store/sweep-user-folders", "vault/, v2.bak/, backbone/vault/, ... and crma leftovers; a writer sweeps",
         "user folders survive, only crma's leftovers go", case_sweep_spares_user_files, 60),
    Case("store/kill-add-3s", "SIGKILL crma add 3 s after its start", "store verifies; next add succeeds",
         case_kill_after_3s, 120),
    Case("store/kill-add-training", "SIGKILL crma add 0.5 s after it printed its start (training)",
         "store verifies; next add succeeds", case_kill_in_training, 120),
    Case("store/kill-add-version-rename", "SIGKILL crma add at registration, a version folder written, not renamed",
         "store verifies; next add succeeds", case_kill_before_version_rename, 120),
    Case("store/kill-add-manifest-rename", "SIGKILL crma add with the new manifest written, not renamed",
         "store verifies; next add succeeds", case_kill_before_manifest_rename, 120),
    Case("store/first-add-interrupted", "SIGKILL the first add on an empty folder before its manifest rename",
         "next add takes the folder over; verify 0", case_first_add_interrupted, 120, "fresh"),
    Case("store/damaged-adapter-serve", "one byte flipped in cooking's adapter weights; crma serve",
         "starts; /health lists cooking unavailable; others answer", case_damaged_adapter_serve, 90),
    Case("store/damaged-adapter-verify", "the same; store verify, then (router flipped too) verify --repair",
         "verify reports cooking; --repair rebuilds the router, says what it cannot fix",
         case_damaged_adapter_verify_repair, 90),
    Case("store/damaged-adapter-eval", "the same; crma eval on cooking and astronomy",
         "exit 1, astronomy evaluated, cooking marked damaged", case_damaged_adapter_eval, 90),
    Case("store/manifest-missing-key", "domains.cooking.current deleted; store list, add",
         "clear error naming the key, no traceback, no training", case_manifest_missing_key, 90),
    Case("store/manifest-truncated", "manifest.json cut in half; store show, serve", "clear error, no traceback",
         case_manifest_truncated, 90),
    Case("store/read-only", "chmod -R a-w on the store; store show, eval, add",
         "show/eval work; add fails cleanly before training", case_read_only_store, 90),
]


# ---- the runner ------------------------------------------------------------------------------------------------
def run_case(case: Case, work: Path, base: Path | None, server: LiveServer | None) -> Result:
    """Run one case in a thread with its timeout; its processes are killed when it ends or times out."""
    folder = work / case.name.replace("/", "_")
    folder.mkdir(parents=True)
    ctx = Ctx(folder, base, server, case.timeout)
    outcome: list[tuple[str, str]] = []

    def body() -> None:
        try:
            outcome.append(("yes", case.func(ctx)))
        except NotHeld as err:
            outcome.append(("no", str(err)))
        except Skipped as err:
            outcome.append(("skipped", str(err)))
        except Exception as err:            # noqa: BLE001 -- an unexpected failure is a case that did not hold
            outcome.append(("no", f"{type(err).__name__}: {err}"))
    t = time.monotonic()
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(case.timeout + 5)
    if thread.is_alive():
        ctx.cleanup()                       # unblocks the case's waits
        thread.join(20)
        outcome.insert(0, ("no", f"timed out after {case.timeout:.0f} s"))
    ctx.cleanup()
    held, detail = outcome[0] if outcome else ("no", "the case ended without a result")
    return Result(case.name, case.did, case.expected, held, short(detail, 400), round(time.monotonic() - t, 1))


def make_base(work: Path) -> tuple[Path, str]:
    """The tiny base store: tiny:llama, modular, cooking (backbone v1) then astronomy (v2)."""
    root = work / "base"
    for domain, extra in (("cooking", ["--model", "tiny:llama"]), ("astronomy", [])):
        done = Proc(work, f"base-{domain}", add_args(root, domain, None, *extra)).wait(180)
        if done.rc != 0:
            sys.exit(f"fault_injection: making the base store failed at {domain} (exit {done.rc}):\n{done.err[-2000:]}")
    return root, f"{', '.join(manifest(root)['domains'])} on {manifest(root)['model']['spec']}"


def environment() -> dict:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()
    crma_path = Path(util.find_spec("crma").origin).parent
    in_repo = crma_path == REPO / "crma"            # else e.g. an export of a commit on PYTHONPATH
    return {"python": platform.python_version(), "torch": version("torch"), "crma": version("crma"),
            "crma_path": str(crma_path), "git_commit": git("rev-parse", "HEAD"),
            "crma_tree_dirty": bool(git("status", "--porcelain", "crma")) if in_repo else None,
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "threads": {"OMP_NUM_THREADS": ENV["OMP_NUM_THREADS"], "crma serve --threads": 1},
            "euid": os.geteuid()}


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(results: list[Result]) -> str:
    rows = ["| case | what was done | expected | held | detail | s |", "|---|---|---|---|---|---|"]
    rows += [f"| {cell(r.case)} | {cell(r.did)} | {cell(r.expected)} | {r.held} | {cell(r.detail)} | {r.seconds} |"
             for r in results]
    return "\n".join(rows)


def totals(results: list[Result]) -> tuple[int, int, int]:
    tried = [r for r in results if r.held != "skipped"]
    return len(tried), sum(r.held == "yes" for r in tried), len(results) - len(tried)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="where the results go")
    parser.add_argument("--only", help="run only the cases whose name contains this")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (stores, logs of every command)")
    parser.add_argument("--jobs", type=int, default=2, help="store cases run this many at a time (default 2; the "
                                                           "server cases always run one at a time)")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.only or args.only in c.name]
    if not cases:
        parser.error(f"no case name contains {args.only!r}: {', '.join(c.name for c in CASES)}")
    started, load_before = time.monotonic(), os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="crma-fault-"))
    results: list[Result] = []
    setup: dict[str, float] = {}
    server = None
    try:
        base = None
        if any(c.group != "fresh" for c in cases):
            t = time.monotonic()
            base, what = make_base(work)
            setup["base_store_s"] = round(time.monotonic() - t, 1)
            print(f"base store: {what} ({setup['base_store_s']} s)", file=sys.stderr, flush=True)
        if any(c.group == "server" for c in cases):
            t = time.monotonic()
            token_file = work / "admin-token"
            token_file.write_text(TOKEN + "\n")
            token_file.chmod(0o600)
            server = LiveServer(work, base, ["--admin-token-file", str(token_file)])
            try:
                server.wait_ready(120)
            except NotHeld as err:
                server.stop()
                server = None
                print(f"the server did not start: {err}", file=sys.stderr, flush=True)
            setup["server_start_s"] = round(time.monotonic() - t, 1)
        done = []

        def one(case: Case) -> Result:
            if case.group == "server" and server is None:
                result = Result(case.name, case.did, case.expected, "no", "the shared crma serve did not start", 0.0)
            else:
                result = run_case(case, work, base, server)
            done.append(result)
            print(f"[{len(done):2d}/{len(cases)}] {case.name:34s} {result.held:7s} {result.seconds:6.1f} s  "
                  f"{short(result.detail, 90)}", file=sys.stderr, flush=True)
            return result
        by_name = {r.case: r for r in map(one, [c for c in cases if c.group == "server"])}   # the server alone
        if server is not None:
            server.stop()
            server = None
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            by_name |= {r.case: r for r in pool.map(one, [c for c in cases if c.group != "server"])}
        results = [by_name[c.name] for c in cases]
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    seconds = round(time.monotonic() - started, 1)
    tried, held, skipped = totals(results)
    total = f"{tried} cases tried, {held} held" + (f", {skipped} skipped" if skipped else "")
    print(table(results))
    print(f"\n{total} ({seconds} s)")
    report = {"total": total, "tried": tried, "held": held, "skipped": skipped, "all_held": tried == held,
              "seconds": seconds, "setup_seconds": setup, "only": args.only, "jobs": args.jobs, **environment(),
              "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
              "cases": [asdict(r) for r in results]}
    write_atomic(args.out / "fault_injection.json", json.dumps(report, indent=2) + "\n")
    env = report
    write_atomic(args.out / "fault_injection.md",
                 f"# Fault injection\n\n`python benchmarks/fault_injection.py`: {total}, {seconds} s "
                 f"(--jobs {args.jobs}; python {env['python']}, torch {env['torch']}, OMP_NUM_THREADS=1, "
                 f"{env['cpu_count']} CPUs, "
                 f"load average {load_before[0]:.2f} before, {report['loadavg_after'][0]:.2f} after; "
                 f"repository at commit {env['git_commit'][:10]}, crma from "
                 f"{'its working tree' if env['crma_tree_dirty'] is not None else env['crma_path']}"
                 f"{' (uncommitted changes under crma/)' if env['crma_tree_dirty'] else ''}).\n\n"
                 f"{table(results)}\n")
    return 0 if tried == held else 1


if __name__ == "__main__":
    sys.exit(main())
