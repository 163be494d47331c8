"""`crma serve` on a tiny real store, over real HTTP on 127.0.0.1: the official openai client for
every model (stream and not), mixed batches equal to one request at a time, hot add while requests
flow, the watcher, a corrupted store refused, every bad input, a full queue, client disconnects."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from openai import OpenAI

from crma.cli import main
from crma.engine.generate import generate
from crma.engine.live import LiveModel
from crma.routing import route_texts
from crma.serve.app import create_app
from crma.serve.config import ServeConfig
from crma.serve.scheduler import in_passing_thread
from crma.serve.server import Server
from crma.store import Store
from tests.conftest import write_cycle_domain

TRAIN = ["--model", "tiny:llama", "--epochs", "1", "--lr", "1e-2", "--batch-size", "8", "--max-len", "64",
         "--eval-batch-size", "8"]
CYCLES = {"up": "abcd", "down": "dcba", "zig": "xyzw", "fresh": "mnop"}
DOMAINS = ["up", "down", "zig"]
MODELS = DOMAINS + ["auto", "base"]
TOKEN = "s3cret"


def add(root: Path, data: Path, name: str, seed: int = 0) -> None:
    assert main(["add", "--store", str(root), "--domain", name, "--data",
                 f"{data / name}.jsonl:{data / name}_hold.jsonl", "--seed", str(seed), *TRAIN]) == 0


def write_cycles(root: Path, seed: int) -> Path:
    """Every CYCLES domain's training (24 passages) and holdout (6) files in `root`, seeded from `seed`."""
    for k, (name, cycle) in enumerate(CYCLES.items()):
        write_cycle_domain(root / f"{name}.jsonl", cycle, 24, seed + k)
        write_cycle_domain(root / f"{name}_hold.jsonl", cycle, 6, seed + 100 + k)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cycles(tmp_path_factory.mktemp("serve_data"), 100)


@pytest.fixture(scope="module")
def store(data, tmp_path_factory) -> Path:
    """A modular tiny:llama store with three domains (three backbone versions)."""
    root = tmp_path_factory.mktemp("serve_store") / "s"
    for name in DOMAINS:
        add(root, data, name)
    return root


@contextmanager
def serving(root: Path, **options):
    """A live server (uvicorn in a thread) on a free loopback port: yields (base url, Server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = Server.open(ServeConfig(store=root, port=port, **options))
    uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline and thread.is_alive():
        time.sleep(0.02)
    assert uv.started
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()


def client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def live(store):
    with serving(store, admin_token=TOKEN, max_batch=32) as (url, server):
        yield url, server


def copy_store(store: Path, tmp_path: Path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(store, root)
    return root


def wait_for(cond, timeout: float = 20.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def complete(c: OpenAI, model: str, prompt: str, max_tokens: int, stream: bool = False, chat: bool = False, **kw):
    """(text, finish_reason, crma info) through the openai client."""
    if chat:
        call = c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                         max_tokens=max_tokens, stream=stream, **kw)
    else:
        call = c.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stream=stream, **kw)
    if not stream:
        choice = call.choices[0]
        return (choice.message.content if chat else choice.text), choice.finish_reason, call.crma
    text, finish, info = "", None, None
    for chunk in call:
        info = chunk.crma
        choice = chunk.choices[0]
        text += (choice.delta.content or "") if chat else choice.text
        finish = choice.finish_reason or finish
    return text, finish, info


# ---- the OpenAI surface through the official client ------------------------------------------------
def test_models_health_and_raw_sse(live):
    url, server = live
    listed = [m.id for m in client(url).models.list()]
    assert listed == MODELS
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["loaded_adapters"] == ["down@v1", "up@v1", "zig@v1"]
    with httpx.stream("POST", url + "/v1/completions", json={"model": "up", "prompt": "abcd", "max_tokens": 5,
                                                               "stream": True, "temperature": 0}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_every_model_completions_and_chat_streaming_and_not(live, store):
    url, _ = live
    c = client(url)
    versions = {"up": 1, "down": 2, "zig": 3}
    ref = LiveModel.open(Store(store))
    routed = route_texts(ref.store.router(), ref.model, ref.tokenizer, ["abcdabcd xyzw"])[0]   # what auto must pick
    for model in MODELS:
        for chat in (False, True):
            whole = complete(c, model, "abcdabcd xyzw", 8, chat=chat, temperature=0)
            streamed = complete(c, model, "abcdabcd xyzw", 8, stream=True, chat=chat, temperature=0)
            assert whole == streamed, (model, chat)
            text, finish, info = whole
            assert finish in ("length", "stop") and info["requested"] == model
            if model in DOMAINS:
                assert info["domain"] == model and info["confidence"] is None
                assert info["adapter"] == f"{model}@v1" and info["backbone_version"] == versions[model]
            elif model == "base":
                assert info["domain"] == "base" and info["adapter"] is None and info["backbone_version"] == 3
            else:
                assert info["domain"] == routed.domain and info["confidence"] == pytest.approx(routed.confidence)
    resp = c.chat.completions.create(model="down", messages=[{"role": "system", "content": "be brief"},
                                                             {"role": "user", "content": "dcba"}],
                                     max_tokens=3, temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(resp)
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].choices == []
    # seeded sampling is reproducible; stop strings end the text (streamed or not)
    a = complete(c, "zig", "xyzw", 12, temperature=0.9, top_p=0.8, seed=7)
    assert a == complete(c, "zig", "xyzw", 12, temperature=0.9, top_p=0.8, seed=7, stream=True)
    text = complete(c, "down", "dcbadcba", 12, temperature=0)[0]
    stop = text[3:5]
    for stream in (False, True):
        cut, finish, _ = complete(c, "down", "dcbadcba", 12, temperature=0, stop=[stop], stream=stream)
        assert cut == text[: text.find(stop)] and finish == "stop"


def test_greedy_output_equals_store_generate(live, store):
    url, _ = live
    c = client(url)
    ref = LiveModel.open(Store(store))
    for model in ("up", "zig", "base"):
        want = generate(ref, "abcdxyzw", domain=model, temperature=0, max_new_tokens=16, raw=True)
        got = complete(c, model, "abcdxyzw", 16, temperature=0)
        assert got[0] == want.text and got[2]["backbone_version"] == want.backbone_version


def test_32_concurrent_requests_equal_one_at_a_time(live):
    """Rows of different prompt lengths, adapters, backbone versions and lengths in one batch compute
    what each request computes alone (greedy, token for token)."""
    url, server = live
    c = client(url)
    jobs = [dict(model=MODELS[k % 5], prompt=("The quick brown fox "[k % 9:] + CYCLES[DOMAINS[k % 3]] * (k % 5))
                 or "x", max_tokens=16 + (7 * k) % 25, stream=k % 4 == 1, chat=k % 3 == 2) for k in range(32)]
    def run(job):
        return complete(c, job["model"], job["prompt"], job["max_tokens"], job["stream"], job["chat"], temperature=0)
    alone = [run(job) for job in jobs]
    before = dict(server.scheduler.stats)
    server.scheduler.stats.update(max_rows=0, max_adapters_in_step=0, max_backbones_in_step=0)
    gate = threading.Event()
    server.scheduler.call(lambda: gate.wait(30))       # hold decoding until 12 requests wait, so that they
    with ThreadPoolExecutor(32) as pool:               # start together; the others join a running batch
        together = pool.map(run, jobs)
        wait_for(lambda: server.scheduler.load()["queued"] >= 12, what="12 queued requests")
        gate.set()
        together = list(together)
    assert together == alone
    stats = server.scheduler.stats
    assert stats["max_rows"] >= 12 and stats["max_adapters_in_step"] >= 3 and stats["max_backbones_in_step"] >= 3
    assert stats["errors"] == before["errors"]
    assert stats["prefills"] - before["prefills"] >= 32                              # read together, in buckets,
    assert stats["prefill_batches"] - before["prefill_batches"] < 32                 # reusing the prefixes the
    assert stats["prefix_tokens_reused"] > before["prefix_tokens_reused"]            # requests alone stored


def test_logprobs_in_a_mixed_batch_equal_one_at_a_time(live):
    """Log-probabilities (and greedy tokens) of rows read together in one prefill bucket, some continuing
    a stored prefix, decoded beside other adapters and backbone versions, equal the request alone."""
    url, server = live
    c = client(url)
    jobs = [(MODELS[k % 5], "abcd abcd " + CYCLES[DOMAINS[k % 3]] * (1 + k % 3)) for k in range(8)]

    def run(job):
        choice = c.completions.create(model=job[0], prompt=job[1], max_tokens=10, temperature=0, logprobs=2).choices[0]
        return choice.text, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs
    alone = [run(job) for job in jobs]
    gate = threading.Event()
    server.scheduler.call(lambda: gate.wait(30))
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = pool.map(run, jobs)
        wait_for(lambda: server.scheduler.load()["queued"] >= len(jobs), what="every request queued")
        gate.set()
        together = list(together)
    for (text, lps, tops), (text1, lps1, tops1) in zip(together, alone, strict=True):
        assert text == text1 and lps == pytest.approx(lps1, abs=1e-4)
        assert [sorted(t) for t in tops] == [sorted(t) for t in tops1]


def test_frozen_store_without_backbone(data, tmp_path):
    root = tmp_path / "frozen"
    for name in ("up", "down"):
        assert main(["add", "--store", str(root), "--domain", name, "--condition", "frozen", "--data",
                     f"{data / name}.jsonl:{data / name}_hold.jsonl", *TRAIN]) == 0
    with serving(root, max_batch=8) as (url, server):
        c = client(url)
        jobs = [("up", "abcd" * k, 10 + k) for k in range(1, 4)] + [("down", "dcba", 12), ("base", "ab", 9)]
        alone = [complete(c, *job, temperature=0) for job in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            assert list(pool.map(lambda job: complete(c, *job, temperature=0), jobs)) == alone
        assert {info["backbone_version"] for _, _, info in alone} == {None}


# ---- hot add, reload, the watcher, a corrupted store -----------------------------------------------
def test_hot_add_while_requests_flow(store, data, tmp_path):
    root = copy_store(store, tmp_path)
    with serving(root, admin_token=TOKEN, max_batch=16) as (url, server):
        c = client(url)
        reference = complete(c, "base", "abcd", 60, temperature=0)          # base on backbone v3
        failures, done, stop, lock = [], [0], threading.Event(), threading.Lock()

        def traffic(k):
            for n in range(10_000):
                if stop.is_set():
                    return
                try:
                    _, finish, _ = complete(c, MODELS[(k + n) % 5], "abcd" * (1 + k), 6, temperature=0)
                    assert finish in ("length", "stop")
                    with lock:
                        done[0] += 1
                except Exception as err:                                    # noqa: BLE001
                    failures.append(repr(err))

        workers = [threading.Thread(target=traffic, args=(k,)) for k in range(4)]
        for w in workers:
            w.start()
        inflight = c.completions.create(model="base", prompt="abcd", max_tokens=60, temperature=0, stream=True)
        chunks = iter(inflight)
        first = next(chunks)                                               # started on the old manifest
        add(root, data, "fresh")                                           # `crma add` while requests flow
        assert [m.id for m in c.models.list()] == MODELS                   # not seen before the reload
        assert httpx.post(url + "/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401
        reloaded = httpx.post(url + "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60).json()
        assert reloaded["status"] == "reloaded" and "fresh" in reloaded["models"]
        rest = list(chunks)
        served_before = done[0]
        wait_for(lambda: done[0] >= served_before + 8, what="traffic after the reload")
        stop.set()
        for w in workers:
            w.join(60)
        assert failures == [] and done[0] > 10
        text = first.choices[0].text + "".join(ch.choices[0].text for ch in rest)
        assert (text, rest[-1].crma["backbone_version"]) == (reference[0], 3)  # finished on its version
        assert [m.id for m in c.models.list()] == ["up", "down", "zig", "fresh", "auto", "base"]
        _, _, info = complete(c, "fresh", "mnopmnop", 6, temperature=0)
        assert info["domain"] == "fresh" and info["backbone_version"] == 4
        assert complete(c, "base", "abcd", 4, temperature=0)[2]["backbone_version"] == 4
        assert httpx.get(url + "/health").json()["loaded_adapters"] == ["down@v1", "fresh@v1", "up@v1", "zig@v1"]


def test_watch_new_version_in_flight_and_a_damaged_domain_isolated(store, data, tmp_path):
    root = copy_store(store, tmp_path)
    with serving(root, admin_token=TOKEN, watch=True, watch_interval=0.1) as (url, server):
        c = client(url)
        old = complete(c, "up", "abcd", 80, temperature=0)
        inflight = iter(c.completions.create(model="up", prompt="abcd", max_tokens=80, temperature=0, stream=True))
        first = next(inflight)
        add(root, data, "up", seed=1)                                      # a second version of `up`
        wait_for(lambda: httpx.get(url + "/health").json()["snapshot"] == 2, what="the watcher's reload")
        new = complete(c, "up", "abcd", 8, temperature=0)
        assert new[2]["adapter"] == "up@v2" and new[2]["backbone_version"] == 4
        rest = list(inflight)
        assert first.choices[0].text + "".join(ch.choices[0].text for ch in rest) == old[0]
        assert rest[-1].crma["adapter"] == "up@v1"                          # both versions served side by side
        wait_for(lambda: httpx.get(url + "/health").json()["loaded_adapters"] == ["down@v1", "up@v2", "zig@v1"],
                 what="the old version unloaded")
        # a damaged file: the watcher takes the new manifest, the damaged domain is unavailable, the rest serves
        target = root / "adapters/down/v1/adapter_model.safetensors"
        raw = bytearray(target.read_bytes())
        raw[-3] ^= 0xFF
        target.write_bytes(bytes(raw))
        assert main(["store", "remove", str(root), "zig"]) == 0            # a new manifest to pick up
        wait_for(lambda: httpx.get(url + "/health").json()["snapshot"] == 3, what="the watcher's reload")
        assert [m.id for m in c.models.list()] == ["up", "auto", "base"]   # zig removed, down unavailable
        with pytest.raises(openai.APIStatusError) as err:
            complete(c, "down", "abcd", 4, temperature=0)
        assert err.value.status_code == 503
        public = httpx.get(url + "/health").json()
        assert public["status"] == "degraded" and "adapters/" not in json.dumps(public)
        full = httpx.get(url + "/health", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert "adapters/down/v1/adapter_model.safetensors: sha256 mismatch" in full["unavailable"]["down"]
        for model in ("up", "auto", "base"):
            assert complete(c, model, "abcd", 4, temperature=0)[1] == "length"


# ---- limits and bad input --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tight(store):
    with serving(store, max_batch=1, max_queue=1, max_prompt_tokens=64, max_tokens=300,
                 max_body_bytes=2048) as (url, server):
        yield url, server


BAD = [  # (path, body, status, param or None)
    ("/v1/completions", b"{", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b"\xff\xfe", 400, None),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": "up"}, 400, "prompt"),
    ("/v1/completions", {"model": "legal", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": "up", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "up", "prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {"model": "up", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": "up", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": "up", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "up", "prompt": "x", "max_tokens": 301}, 400, "max_tokens"),
    ("/v1/completions", {"model": "up", "prompt": "x", "seed": "s"}, 400, "seed"),
    ("/v1/completions", {"model": "up", "prompt": "x", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", b'{"model": "up", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", b"[" * 1020 + b"]" * 1020, 400, None),
    ("/v1/completions", {"model": "up", "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "up", "prompt": "x", "logprobs": 6}, 400, "logprobs"),        # OpenAI's max: 5
    ("/v1/completions", {"model": "up", "prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": "up", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"model": "up", "prompt": "x", "top_k": 5}, 400, "top_k"),   # would change the output
    ("/v1/completions", {"model": "up", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": "up", "prompt": "x" * 100}, 400, "prompt"),
    ("/v1/completions", {"model": "up", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "up", "prompt": ["a", "b"], "stream": True}, 400, "prompt"),  # several: not streamed
    ("/v1/completions", {"model": "up", "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"model": "up", "prompt": "x" * 3000}, 413, None),
    ("/v1/chat/completions", {"model": "up", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "up", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"model": "up", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, None),
    ("/v1/chat/completions", {"model": "up", "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
     400, "tools"),
    ("/v1/chat/completions", {"model": "up", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),                                                                    # without logprobs=true
    ("/v1/chat/completions", {"model": "auto", "messages": "hi"}, 400, "messages"),
]


def test_every_bad_input_gets_a_4xx_error_object(tight):
    url, server = tight
    for path, body, status, param in BAD:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        resp = httpx.post(url + path, content=content, headers={"content-type": "application/json"})
        assert resp.status_code == status, (body, resp.text)
        err = resp.json()["error"]
        assert err["message"] and err["type"]
        if param is not None:
            assert err["param"] == param, (body, err)
    def chunked():                                                          # no Content-Length: counted as it comes
        for _ in range(10):
            yield b" " * 500
    assert httpx.post(url + "/v1/completions", content=chunked()).status_code == 413
    assert httpx.post(url + "/admin/reload").status_code == 404            # no admin token: no admin endpoints
    assert httpx.get(url + "/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert httpx.get(url + "/v1/completions").status_code == 405
    c = client(url)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="legal", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.chat.completions.create(model="up", messages=[{"role": "user", "content": "x"}], max_tokens=10_000)
    assert complete(c, "up", "abcd", 3, temperature=0)[1] == "length"       # still serving
    assert server.scheduler.stats["errors"] == 0


def test_full_queue_gets_503_with_retry_after_and_disconnects_free_slots(tight, monkeypatch):
    url, server = tight
    step = server.scheduler._step

    def slow_step():                                   # a tiny model decodes 400 tokens in 0.2 s: slow it
        time.sleep(0.01)                               # down so that requests are still running when checked
        step()
    monkeypatch.setattr(server.scheduler, "_step", slow_step)
    health = lambda: httpx.get(url + "/health").json()                     # noqa: E731
    body = {"model": "base", "prompt": "abcd", "max_tokens": 300, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
        with a.stream("POST", url + "/v1/completions", json=body) as running:
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data:"))         # running: the only batch slot
            with b.stream("POST", url + "/v1/completions", json=body) as queued:
                assert queued.status_code == 200
                wait_for(lambda: health()["queued"] == 1, what="a queued request")
                full = httpx.post(url + "/v1/completions", json=body)
                assert full.status_code == 503 and full.headers["retry-after"] == "1"
                assert full.json()["error"]["code"] == "queue_full"
            # the queued client went away: its place is freed before it ever ran
            wait_for(lambda: health()["queued"] == 0, what="the queued request dropped")
        # the running client disconnected mid-stream: its slot is freed
        wait_for(lambda: health()["active"] == 0, what="the streaming slot freed")
    cancelled = server.scheduler.stats["cancelled"]
    assert cancelled >= 2
    raw = json.dumps({**body, "stream": False}).encode()                    # a non-streaming client gives up
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))
        wait_for(lambda: health()["active"] == 1, what="the request running")
    wait_for(lambda: health()["active"] == 0 and server.scheduler.stats["cancelled"] > cancelled,
             what="the abandoned request cancelled")
    t = time.time()
    assert complete(client(url), "up", "abcd", 3, temperature=0)[1] == "length"   # served at once
    assert time.time() - t < 10


# ---- the command line --------------------------------------------------------------------------------
def test_crma_serve_command_line(store):
    from crma.cli import build_parser
    from crma.cli.options import build

    args = build_parser().parse_args(["serve", "--store", str(store), "--port", "9", "--max-batch", "4", "--watch"])
    cfg = build(args, ServeConfig, device=None)
    assert (cfg.port, cfg.max_batch, cfg.watch, cfg.admin_token, cfg.host) == (9, 4, True, None, "127.0.0.1")
    assert main(["serve", "--store", str(store), "--max-batch", "0"]) == 2      # refused before loading anything
    assert main(["serve", "--store", str(store), "--packed-linears", "float16", "--dtype", "bfloat16"]) == 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "crma", "serve", "--store", str(store), "--port", str(port),
                             "--log-level", "warning", "--threads", "1", "--packed-linears", "float16"],
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CRMA_ADMIN_TOKEN": TOKEN},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                return False
        wait_for(up, timeout=90, what="crma serve to start")
        assert complete(client(url), "zig", "xyzw", 4, temperature=0)[2]["domain"] == "zig"
        full = httpx.get(url + "/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).json()
        assert full["packed_linears"] == "float16"
    finally:
        proc.send_signal(signal.SIGTERM)                  # uvicorn shuts down gracefully, then re-raises
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)    # the signal it caught


def test_loading_runs_on_a_passing_thread_and_hands_back_its_result_or_error():
    here = threading.get_ident()
    ident, thread = in_passing_thread(lambda: (threading.get_ident(), threading.current_thread()))
    assert ident != here and not thread.is_alive()                  # its OpenMP pool went with it
    with pytest.raises(KeyError, match="missing"):
        in_passing_thread(lambda: {}["missing"])


def test_threads_default_to_every_usable_core_unless_limited(monkeypatch):
    from crma.serve.server import serving_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert serving_threads(None) == len(os.sched_getaffinity(0))
    assert serving_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert serving_threads(None) == 1 and serving_threads(2) == 2
