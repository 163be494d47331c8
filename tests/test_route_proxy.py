"""`crma route-proxy` over real HTTP on 127.0.0.1, in front of a stub upstream (a small FastAPI app that records
what it was sent and answers like an OpenAI server): `auto` requests are routed by the store's router
exactly as route_texts decides, forwarded with `model` set to the choice and nothing else changed, streamed
answers pass through chunk by chunk, and every answer carries crma serve's `crma` object."""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from openai import OpenAI

from crma.cli import main
from crma.export.vllm import ExportConfig, export_store
from crma.routing import route_texts
from crma.serve.auth import load_keys
from crma.serve.proxy import Proxy, ProxyConfig
from crma.serve.proxy_app import create_proxy_app
from crma.store import Store
from tests.conftest import write_cycle_domain

TRAIN = ["--model", "tiny:llama", "--epochs", "1", "--lr", "1e-2", "--batch-size", "8", "--max-len", "64",
         "--eval-batch-size", "8", "--min-gain", "-100", "--condition", "frozen"]
CYCLES = {"up": "abcd", "down": "dcba", "zig": "the cat sat on the mat "}   # zig: words, not noise
PIECES = ["Hello", " from", " upstream"]


def add(root: Path, data: Path, name: str) -> None:
    assert main(["add", "--store", str(root), "--domain", name, "--data",
                 f"{data / name}.jsonl:{data / name}_hold.jsonl", *TRAIN]) == 0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("proxy_data")
    for k, (name, cycle) in enumerate(CYCLES.items()):
        write_cycle_domain(root / f"{name}.jsonl", cycle, 16, 500 + k)
        write_cycle_domain(root / f"{name}_hold.jsonl", cycle, 4, 600 + k)
    return root


@pytest.fixture(scope="module")
def store(data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("proxy_store") / "s"
    for name in ("up", "down"):
        add(root, data, name)
    return root


def stub_upstream(received: list, models: set[str]) -> FastAPI:
    """An OpenAI-like server: records (path, headers, body); 404 for a model it does not serve."""
    app = FastAPI()

    async def answer(request: Request, chat: bool):
        body = await request.json()
        received.append((request.url.path, dict(request.headers), body))
        if body["model"] not in models:
            return JSONResponse({"error": {"message": f"no model {body['model']}", "type": "NotFoundError",
                                           "param": None, "code": 404}}, status_code=404)
        obj = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            choice = {"index": 0, "finish_reason": "stop", "logprobs": None}
            choice.update({"message": {"role": "assistant", "content": "".join(PIECES)}} if chat
                          else {"text": "".join(PIECES)})
            return {"id": "x-1", "object": obj, "created": 1, "model": body["model"], "choices": [choice],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}

        async def events():
            for i, piece in enumerate(PIECES):
                choice = {"index": 0, "finish_reason": "stop" if i == len(PIECES) - 1 else None, "logprobs": None}
                choice.update({"delta": {"content": piece}} if chat else {"text": piece})
                yield f"data: {json.dumps({'id': 'x-1', 'object': obj + '.chunk', 'created': 1, 'model': body['model'], 'choices': [choice]})}\n\n"  # noqa: E501
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, True)
    return app


@contextmanager
def running(app):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not uv.started and time.time() < deadline:
        time.sleep(0.02)
    assert uv.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def proxied(store: Path, models=("up", "down", "base"), keys=(), **options):
    """(proxy URL, what the upstream received)."""
    received: list = []
    with running(stub_upstream(received, set(models))) as upstream:
        proxy = Proxy(ProxyConfig(store=store, upstream=upstream, **options), keys)
        with running(create_proxy_app(proxy)) as url:
            yield url, received


def client(url: str, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


QUERIES = ["abcdabcdabcdabcdabcdabcd abcd", "dcbadcbadcbadcbadcbadcbadcba", "What is the capital of France?"]


def holdout(data: Path, name: str, k: int) -> str:
    return json.loads((data / f"{name}_hold.jsonl").read_text().splitlines()[k])["text"]


def test_auto_is_routed_like_the_router_and_only_model_changes(store, data):
    router = Store(store).router()
    queries = [holdout(data, "up", 0), holdout(data, "down", 1), QUERIES[2]]
    want = route_texts(router, None, None, queries)
    assert [d.domain for d in want] == ["up", "down", "base"]               # the router tells them apart
    with proxied(store) as (url, received):
        c = client(url)
        for query, dec in zip(queries, want):
            r = c.chat.completions.create(model="auto", messages=[{"role": "system", "content": "Be brief."},
                                                                  {"role": "user", "content": query}],
                                          max_tokens=7, temperature=0, extra_body={"top_k": 1})
            path, headers, body = received[-1]
            assert path == "/v1/chat/completions" and body["model"] == dec.domain
            assert body == {"model": dec.domain, "messages": [{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": query}],
                            "max_tokens": 7, "temperature": 0, "top_k": 1}
            assert r.choices[0].message.content == "".join(PIECES)
            info = r.crma
            assert info["domain"] == dec.domain and info["requested"] == "auto"
            assert info["confidence"] == pytest.approx(float(dec.confidence), abs=1e-9)
            assert info["runner_up"] == dec.runner_up and info["reason"] == (dec.reason or None)
            if dec.domain != "base":
                assert info["adapter"] == dec.domain and info["adapter_version"] == 1
            assert info["manifest_updated"] == Store(store).manifest["updated"]
        assert {b["model"] for _, _, b in received} == {d.domain for d in want}
        r = c.completions.create(model="auto", prompt=queries[0], max_tokens=3)
        assert received[-1][2] == {"model": want[0].domain, "prompt": queries[0], "max_tokens": 3}
        assert r.choices[0].text == "".join(PIECES) and r.crma["domain"] == want[0].domain


def test_streaming_passes_chunks_through_with_crma(store, data):
    query = holdout(data, "down", 1)
    dec = route_texts(Store(store).router(), None, None, [query])[0]
    assert dec.domain == "down"
    with proxied(store) as (url, received):
        c = client(url)
        chunks = list(c.chat.completions.create(model="auto", messages=[{"role": "user", "content": query}],
                                                max_tokens=5, stream=True))
        assert [ch.choices[0].delta.content for ch in chunks] == PIECES
        assert all(ch.crma["domain"] == dec.domain and ch.model == dec.domain for ch in chunks)
        assert received[-1][2]["stream"] is True and received[-1][2]["model"] == dec.domain
        pieces = [ch.choices[0].text for ch in c.completions.create(model="down", prompt="x", stream=True)]
        assert pieces == PIECES and received[-1][2]["model"] == "down"


def test_named_models_errors_and_reload(store, data, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(store, root)
    with proxied(root, models=("up", "down", "base", "zig")) as (url, received):
        c = client(url)
        r = c.completions.create(model="up", prompt="abc", max_tokens=2)
        assert received[-1][2]["model"] == "up" and r.crma["confidence"] is None and r.crma["requested"] == "up"
        n = len(received)
        http = httpx.Client(base_url=url, timeout=30)
        bad = http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found"
        ids = http.post("/v1/completions", json={"model": "auto", "prompt": [1, 2, 3]})
        assert ids.status_code == 400 and "token ids" in ids.json()["error"]["message"]
        broken = http.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
        assert broken.status_code == 400
        assert http.post("/v1/completions", json={"model": "up", "prompt": "x"},
                         headers={"host": "evil.example"}).status_code == 400
        assert len(received) == n                                         # nothing bad reached the upstream
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["up", "down", "auto", "base"]
        up = http.get("/health")
        assert up.status_code == 200 and up.json()["upstream_health"] == "ok"
        export_store(ExportConfig(store=root, out=tmp_path / "vllm"))
        with proxied(root, models=("up", "down", "base", "zig"), export=tmp_path / "vllm") as (ex_url, _):
            ex = httpx.Client(base_url=ex_url, timeout=30)
            add(root, data, "zig")                                        # a new domain: picked up, no restart
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["up", "down", "zig", "auto", "base"]
            assert c.completions.create(model="zig", prompt="x").crma["adapter"] == "zig"
            # behind an export, only what the upstream was given: zig once it is exported (and hot-added)
            assert ex.post("/v1/completions", json={"model": "zig", "prompt": "x"}).status_code == 404
            texts = [holdout(data, "zig", k) for k in range(4)]
            zig = next(t for t, d in zip(texts, route_texts(Store(root).router(), None, None, texts))
                       if d.domain == "zig")
            assert ex.post("/v1/completions", json={"model": "auto", "prompt": zig}).json()["crma"]["domain"] != "zig"
            export_store(ExportConfig(store=root, out=tmp_path / "vllm"))
            assert [m["id"] for m in ex.get("/v1/models").json()["data"]] == ["up", "down", "zig", "auto", "base"]
            assert ex.post("/v1/completions", json={"model": "auto", "prompt": zig}).json()["crma"]["domain"] == "zig"
    with proxied(root, models=("up",)) as (url, received):                # the upstream's own errors come back
        r = httpx.post(url + "/v1/completions", json={"model": "down", "prompt": "x"}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["message"] == "no model down"
    dead = ProxyConfig(store=root, upstream="http://127.0.0.1:9")       # nothing listens on port 9
    with running(create_proxy_app(Proxy(dead))) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "up", "prompt": "x"}, timeout=30)
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
        down = httpx.get(url + "/health", timeout=30)                      # a load balancer skips this proxy
        assert down.status_code == 503 and down.json()["status"] == "upstream_unavailable"


def test_keys_limit_domains_and_stay_at_the_proxy(store, data, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("alpha-key-123 up\nbeta-key-4567\n")
    keys.chmod(0o600)
    upkey = tmp_path / "upstream-key"
    upkey.write_text("vllm-secret\n")
    with proxied(store, keys=load_keys([], keys), upstream_key_file=upkey) as (url, received):
        assert httpx.post(url + "/v1/completions", json={"model": "up", "prompt": "x"}).status_code == 401
        assert client(url, "alpha-key-123").completions.create(model="up", prompt="x").crma["domain"] == "up"
        assert received[-1][1]["authorization"] == "Bearer vllm-secret"   # the proxy's key never goes upstream
        r = httpx.post(url + "/v1/completions", json={"model": "down", "prompt": "x"},
                       headers={"authorization": "Bearer alpha-key-123"})
        assert r.status_code == 403
        r = client(url, "alpha-key-123").completions.create(model="auto", prompt=holdout(data, "down", 1))
        assert r.crma["domain"] in ("up", "base")                          # auto chooses among the key's domains
        r = client(url, "beta-key-4567").completions.create(model="auto", prompt=holdout(data, "down", 1))
        assert r.crma["domain"] == "down"
