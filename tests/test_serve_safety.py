"""`crma serve` under hostile and careless clients (issue 18, findings 1, 6 and 7), on a live server on
127.0.0.1: a request that breaks sampling fails alone, never its batch; every value the sampler cannot
take is a 400 naming the parameter (never a 500, which the `openai` client retries); strict JSON types;
tokenising off the event loop; the Host allow-list, cross-origin requests refused, /health without paths
unless authenticated; stalled connections closed, a connection cap; the admin token from a file."""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

import crma.serve.scheduler as scheduler_module
from crma.cli import build_parser, main
from crma.cli.options import build
from crma.cli.serve import admin_token
from crma.serve.app import uvicorn_config
from crma.serve.config import ServeConfig
from crma.serve.decoding import Sampler
from crma.serve.server import Server
from tests.test_serve import client, complete, wait_for

FIXTURE = Path(__file__).parent / "fixtures" / "store-0.1.0"    # tiny:llama, modular: cooking, astronomy
TOKEN = "t0k3n-from-a-file"
LIMITS = dict(timeout_keep_alive=1.0, timeout_headers=1.0, timeout_body=1.0, max_connections=24)
PROMPTS = ["Knead the dough", "The stars", "abc", "Bake at", "Planets orbit", "xyz", "Salt and", "Comets"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety") / "store"
    shutil.copytree(FIXTURE, root)
    return root


@contextmanager
def serving(root: Path, **options):
    """A live server with crma's transport limits (uvicorn_config) on a free loopback port:
    yields (base url, Server, uvicorn.Server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = Server.open(ServeConfig(store=root, port=port, **options))
    uv = uvicorn.Server(uvicorn_config(server, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: uv.started or not thread.is_alive(), timeout=30, what="the server to start")
    assert uv.started
    try:
        yield f"http://127.0.0.1:{port}", server, uv
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def live(store, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    with serving(store, admin_token_file=token_file, max_batch=16, max_tokens=64, **LIMITS) as running:
        yield running


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def post(url: str, body, headers: dict | None = None, path: str = "/v1/completions") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, timeout=60,
                      headers={"content-type": "application/json", **(headers or {})})


# ---- finding 1: one bad request never takes its batch down ---------------------------------------
class FaultySampler(Sampler):
    """Sampling fails on the third token of the request seeded 4242 (a fault injected at the exact
    spot a broken value used to hit: one row's sampling, inside a batch step)."""

    def __init__(self, params):
        super().__init__(params)
        self.faulty, self.calls = params.seed == 4242, 0

    def draw(self, probs, ids, whole):
        self.calls += 1
        if self.faulty and self.calls == 3:
            raise RuntimeError("injected sampling fault")
        return super().draw(probs, ids, whole)


def test_hostile_requests_fail_alone_and_8_streams_complete(live, monkeypatch):
    url, server, _ = live
    c = client(url)
    models = ["cooking", "astronomy", "auto", "base"]
    jobs = [dict(model=models[k % 4], prompt=p, max_tokens=10 + k, stream=True, chat=k % 3 == 2)
            for k, p in enumerate(PROMPTS)]

    def run(job, **kw):
        return complete(c, job["model"], job["prompt"], job["max_tokens"], job["stream"], job["chat"],
                        **{"temperature": 0, **kw})
    alone = [run(job) for job in jobs]
    greedy = complete(c, "cooking", "Knead the dough", 12, temperature=0)
    monkeypatch.setattr(scheduler_module, "Sampler", FaultySampler)
    errors_before = server.scheduler.stats["errors"]
    server.scheduler.stats["max_rows"] = 0
    hostile = [dict(temperature=1.5e-39), dict(temperature=1e-38, stream=True), dict(temperature=5e-324),
               dict(temperature=0.7, seed=4242)]

    def attack(kw):
        try:
            return complete(c, "cooking", "Knead the dough", 12, **kw)
        except openai.APIStatusError as err:
            return err.status_code
    gate = threading.Event()
    server.scheduler.call(lambda: gate.wait(30))        # all of them in one batch: hold decoding until queued
    with ThreadPoolExecutor(len(jobs) + len(hostile)) as pool:
        streams = pool.map(run, jobs)
        attacks = pool.map(attack, hostile)
        wait_for(lambda: server.scheduler.load()["queued"] == len(jobs) + len(hostile), what="every request queued")
        gate.set()
        streams, attacks = list(streams), list(attacks)
    assert streams == alone                                          # the 8 complete, with their normal text
    assert server.scheduler.stats["max_rows"] >= len(jobs) + len(hostile) - 1
    assert attacks[:3] == [greedy, greedy, greedy]                   # a tiny temperature is greedy
    assert attacks[3] == 500                                         # the broken row alone failed
    assert server.scheduler.stats["errors"] == errors_before + 1
    assert complete(c, "astronomy", "The stars", 4, temperature=0.5, seed=1)[1] in ("length", "stop")   # serving


NUMBERS = ["max_tokens", "temperature", "top_p", "seed", "n"]


def test_values_the_sampler_cannot_take_are_400_naming_the_parameter(live):
    url, server, _ = live
    base = {"model": "cooking", "prompt": "abc", "max_tokens": 3}
    for param in NUMBERS:
        for value in ("4", "yes", True, "0.5", [1], {"v": 1}):
            resp = post(url, {**base, param: value})
            assert resp.status_code == 400, (param, value, resp.text)
            assert resp.json()["error"]["param"] == param, (param, value, resp.json())
    for param in ("temperature", "top_p"):
        for raw in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
            resp = post(url, b'{"model": "cooking", "prompt": "abc", "%s": %s}' % (param.encode(), raw))
            assert resp.status_code == 400 and resp.json()["error"]["param"] == param, (param, raw, resp.text)
    for body in ({"stream": "yes"}, {"stream_options": {"include_usage": 1}}):
        assert post(url, {**base, **body}).status_code == 400, body
    for param, value in (("max_tokens", True), ("temperature", "0"), ("seed", "7")):
        with pytest.raises(openai.BadRequestError, match=param):
            client(url).chat.completions.create(model="cooking", messages=[{"role": "user", "content": "hi"}],
                                                **{"max_tokens": 3, param: value})
    # what OpenAI accepts still works: an integer where a number is expected, 0 and 2 at the edges
    for extra in ({"temperature": 1}, {"temperature": 0}, {"temperature": 2, "top_p": 0, "seed": -(2**63)},
                  {"top_p": 1, "seed": 2**64 - 1}):
        resp = post(url, {**base, **extra})
        assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] == "length", (extra, resp.text)


def test_a_lone_surrogate_is_a_400_naming_the_field(live):
    url, _, _ = live
    cases = [(b'{"model": "cooking", "prompt": "abc\\ud800"}', "/v1/completions", "prompt"),
             (b'{"model": "cooking", "prompt": ["\\udfff"]}', "/v1/completions", "prompt.0"),
             (b'{"model": "cooking", "prompt": "abc", "stop": ["\\ud834"]}', "/v1/completions", "stop.0"),
             (b'{"model": "\\ud800", "prompt": "abc"}', "/v1/completions", "model"),
             (b'{"model": "cooking", "messages": [{"role": "user", "content": "hi \\udc00"}]}', "/v1/chat/completions",
              "messages.0.content")]
    for body, path, param in cases:
        resp = post(url, body, path=path)
        assert resp.status_code == 400, (body, resp.text)
        assert resp.json()["error"]["param"] == param and "surrogate" in resp.json()["error"]["message"]
    assert post(url, {"model": "cooking", "prompt": "caf\u00e9 \U0001f35e", "max_tokens": 2}).status_code == 200


def test_tokenising_does_not_block_the_event_loop(live):
    """A prompt that takes long to tokenise (1 MiB ones do) must not stall /health meanwhile."""
    url, server, _ = live
    real, started = server.tokenizer, threading.Event()

    class SlowTokenizer:
        def __call__(self, *args, **kwargs):
            started.set()
            time.sleep(2.0)
            return real(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(real, name)
    server.tokenizer = SlowTokenizer()
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(post, url, {"model": "cooking", "prompt": "abc", "max_tokens": 2})
            assert started.wait(10)
            t = time.perf_counter()
            assert httpx.get(url + "/health", timeout=10).status_code == 200
            waited = time.perf_counter() - t
            assert pending.result().status_code == 200
    finally:
        server.tokenizer = real
    assert waited < 1.0, f"/health waited {waited:.2f} s for a tokeniser"


# ---- finding 6: a web page cannot drive the server; /health; the admin token --------------------
def test_host_allow_list_and_cross_origin_requests_refused(live):
    url, server, _ = live
    port = port_of(url)
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.:1"):
        resp = httpx.get(url + "/v1/models", headers={"host": host})
        assert resp.status_code in (400, 403, 421), (host, resp.status_code)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert httpx.get(url + "/v1/models", headers={"host": host}).status_code == 200, host
    body = json.dumps({"model": "cooking", "prompt": "abc", "max_tokens": 2}).encode()
    prefills = server.scheduler.stats["prefills"]
    refused = [  # what a web page on another origin can send without a CORS preflight, and its preflight
        ("POST", {"content-type": "text/plain", "origin": "http://evil.example"}, 403),
        ("POST", {"content-type": "application/json", "origin": "http://evil.example"}, 403),
        ("POST", {"content-type": "text/plain;charset=UTF-8", "origin": "null"}, 403),
        ("OPTIONS", {"origin": "http://evil.example", "access-control-request-method": "POST"}, 403),
        ("POST", {"content-type": "text/plain"}, 415),               # no Origin (an old browser, a form): still no
        ("POST", {"content-type": "application/x-www-form-urlencoded"}, 415),
        ("POST", {"content-type": "multipart/form-data; boundary=x"}, 415),
        ("POST", {}, 415),
    ]
    for method, headers, status in refused:
        resp = httpx.request(method, url + "/v1/completions", content=body, headers=headers)
        assert resp.status_code == status, (method, headers, resp.status_code, resp.text)
        assert resp.json()["error"]["message"]
    assert post(url, body, path="/v1/chat/completions", headers={"content-type": "text/plain"}).status_code == 415
    assert server.scheduler.stats["prefills"] == prefills                # no completion ran
    for origin in (f"http://localhost:{port}", f"http://127.0.0.1:{port}", f"http://[::1]:{port}"):
        assert post(url, body, headers={"origin": origin}).status_code == 200, origin
    assert post(url, body, headers={"content-type": "application/json; charset=utf-8"}).status_code == 200


def test_health_has_no_paths_without_the_admin_token(live, store):
    url, server, _ = live
    snap = server.registry.current
    snap.unavailable["ghost"] = f"{store}/adapters/ghost/v1/adapter_model.safetensors: sha256 mismatch"
    server.last_reload, last = {"status": "refused", "error": f"{store}/manifest.json: damaged", "at": 1.0}, \
        server.last_reload
    try:
        public = httpx.get(url + "/health")
        assert public.status_code == 200
        text = public.text
        assert str(store) not in text and "adapters/" not in text and "manifest.json" not in text and "/" not in text
        got = public.json()
        assert "store" not in got and got["status"] == "degraded" and list(got["unavailable"]) == ["ghost"]
        assert got["last_reload"]["status"] == "refused" and got["models"] == ["cooking", "astronomy", "auto", "base"]
        full = httpx.get(url + "/health", headers={"authorization": f"Bearer {TOKEN}"}).json()
        assert full["store"] == str(store) and "adapters/ghost/v1" in full["unavailable"]["ghost"]
        assert "manifest.json" in full["last_reload"]["error"]
        assert httpx.get(url + "/health", headers={"authorization": "Bearer wrong"}).status_code == 401
    finally:
        del snap.unavailable["ghost"]
        server.last_reload = last
    # the token came from --admin-token-file: the admin endpoint takes it
    resp = httpx.post(url + "/admin/reload", headers={"authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert resp.status_code == 200 and resp.json()["status"] == "unchanged"


def test_admin_token_from_a_file_or_the_environment(store, tmp_path, capsys):
    secret = tmp_path / "token"
    secret.write_text("  s3cret-file \nignored second line\n")
    secret.chmod(0o600)
    args = build_parser().parse_args(["serve", "--store", str(store), "--admin-token-file", str(secret),
                                      "--allowed-hosts", "crma.lan,*.example.org", "--timeout-headers", "2.5",
                                      "--max-connections", "50"])
    cfg = admin_token(build(args, ServeConfig, device=None), environ={"CRMA_ADMIN_TOKEN": "from-env"})
    assert (cfg.admin_token, cfg.allowed_hosts, cfg.timeout_headers, cfg.max_connections) == \
        ("s3cret-file", ("crma.lan", "*.example.org"), 2.5, 50)
    assert "crma.lan" in cfg.host_names() and "[::1]" in cfg.host_names()
    assert "warning" not in capsys.readouterr().err
    args = build_parser().parse_args(["serve", "--store", str(store)])
    assert admin_token(build(args, ServeConfig, device=None), environ={"CRMA_ADMIN_TOKEN": "e"}).admin_token == "e"
    assert admin_token(build(args, ServeConfig, device=None), environ={}).admin_token is None
    args = build_parser().parse_args(["serve", "--store", str(store), "--admin-token", "visible"])
    assert admin_token(build(args, ServeConfig, device=None), environ={}).admin_token == "visible"
    assert "process list" in capsys.readouterr().err                       # still works, with a warning
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for bad in (["--admin-token-file", str(tmp_path / "missing")], ["--admin-token-file", str(empty)],
                ["--admin-token-file", str(secret), "--admin-token", "x"], ["--allowed-hosts", "a*b"],
                ["--timeout-keep-alive", "0"], ["--max-connections", "0"]):
        assert main(["serve", "--store", str(store), *bad]) == 2, bad      # refused before loading anything
    assert "s3cret-file" not in capsys.readouterr().err


# ---- finding 6: stalled connections, the connection cap ------------------------------------------
def closed_within(conn: socket.socket, limit: float) -> tuple[float, bytes]:
    """Seconds until the server closes `conn` (reading what it sent), failing after `limit`."""
    conn.settimeout(limit)
    t, got = time.perf_counter(), b""
    try:
        while chunk := conn.recv(4096):
            got += chunk
    except TimeoutError:
        raise AssertionError(f"the connection was still open after {limit} s (got {got[:80]!r})") from None
    except ConnectionResetError:
        pass
    return time.perf_counter() - t, got


def test_stalled_connections_are_closed(live):
    url, _, _ = live
    addr = ("127.0.0.1", port_of(url))
    with socket.create_connection(addr) as silent, socket.create_connection(addr) as half_head, \
            socket.create_connection(addr) as half_body, socket.create_connection(addr) as idle:
        half_head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
        half_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"model\": ")
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        t = time.perf_counter()
        waited, got = closed_within(silent, 10)
        assert waited < 3 and got == b""                                   # nothing sent: closed without a word
        waited, got = closed_within(half_head, 10)
        assert got.startswith(b"HTTP/1.1 408") and b"request_timeout" in got
        waited, got = closed_within(half_body, 10)
        assert got.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in got
        waited, got = closed_within(idle, 10)
        assert got.startswith(b"HTTP/1.1 200") and b'"status"' in got         # answered, then idle: closed
        assert time.perf_counter() - t < 6                                # all four within their timeouts


def test_connection_cap(live):
    url, server, uv = live
    addr, cap = ("127.0.0.1", port_of(url)), server.cfg.max_connections
    wait_for(lambda: len(uv.server_state.connections) == 0, timeout=10, what="the earlier connections closed")
    body = json.dumps({"model": "base", "prompt": "abc", "max_tokens": 2, "temperature": 0}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    gate = threading.Event()
    server.scheduler.call(lambda: gate.wait(30))         # requests wait in the queue: their connections stay open
    conns = []
    try:
        for _ in range(cap):
            conn = socket.create_connection(addr)
            conn.sendall(request)
            conns.append(conn)
        wait_for(lambda: server.scheduler.load()["queued"] == cap, what=f"{cap} requests queued")
        with socket.create_connection(addr) as extra:
            waited, got = closed_within(extra, 10)
        assert got.startswith(b"HTTP/1.1 503") and b"too many open connections" in got
        gate.set()
        for conn in conns:
            conn.settimeout(30)
            reply = b""
            while b'"finish_reason"' not in reply:
                chunk = conn.recv(65536)
                assert chunk, reply
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200")
    finally:
        gate.set()
        for conn in conns:
            conn.close()
    assert complete(client(url), "cooking", "abc", 2, temperature=0)[1] == "length"

