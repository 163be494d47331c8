"""Fault-injection cases against a live `crma serve`: hostile values, bodies, hosts, origins, idle and
half-sent connections, the admin token's visibility."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from .harness import (
    TOKEN,
    Ctx,
    NotHeld,
    error_of,
    expect,
    raw_exchange,
    short,
)


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
