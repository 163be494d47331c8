"""Load check of `crma serve` with API keys, metrics and the routing log on (loopback only, bounded).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_load.py [--connections 200] [--out benchmarks/results]

Builds a tiny:llama store with two domains, starts `crma serve` as its own process (API keys from a file,
one limited to a domain; --route-log), then opens N connections at once: 90% send a well-formed chat
request (streamed or not, over the models and keys), 5% send half a body and go silent (slow), 5% start a
stream and disconnect. Checks, and writes to OUT/serve_load.{json,md}:

- every well-formed request succeeded (200, a finished answer);
- the server's resident memory after the burst (and a pause) is within 10% of its level before it, measured
  after a warm-up burst of a tenth the size (every path once: the first use of a code path allocates for
  good, which is not a leak);
- /metrics counters equal what was sent: successes by model, refusals, cancelled streams; the routing log
  holds one line per finished request.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crma.io import write_text  # noqa: E402
from tests.conftest import write_cycle_domain  # noqa: E402

KEYS = {"all": "sk-load-all-0123456789", "up": "sk-load-up-0123456789"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def metric_sum(text: str, name: str, **labels) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def build_store(work: Path) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k, (name, cycle) in enumerate({"up": "abcd", "down": "dcba"}.items()):
        write_cycle_domain(work / f"{name}.jsonl", cycle, 24, k)
        write_cycle_domain(work / f"{name}_hold.jsonl", cycle, 6, 10 + k)
        subprocess.run([sys.executable, "-m", "crma", "add", "--store", str(work / "store"), "--domain", name,
                        "--data", f"{work / name}.jsonl:{work / name}_hold.jsonl", "--model", "tiny:llama",
                        "--epochs", "1", "--lr", "1e-2", "--batch-size", "8", "--max-len", "64"],
                       check=True, env=env, capture_output=True, cwd=ROOT)
    return work / "store"


async def well_formed(client: httpx.AsyncClient, url: str, key: str, model: str, stream: bool) -> bool:
    body = {"model": model, "messages": [{"role": "user", "content": "abcdabcd"}], "max_tokens": 8,
            "temperature": 0, "stream": stream}
    headers = {"Authorization": f"Bearer {key}"}
    try:
        if not stream:
            r = await client.post(url + "/v1/chat/completions", json=body, headers=headers)
            return r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        done = False
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                return False
            async for line in r.aiter_lines():
                done = done or line.strip() == "data: [DONE]"
        return done
    except httpx.HTTPError:
        return False


async def slow(host: str, port: int, key: str) -> None:
    """Headers and half a body, then silence: the server's body deadline must end it (408)."""
    reader, writer = await asyncio.open_connection(host, port)
    body = json.dumps({"model": "up", "messages": [{"role": "user", "content": "abcd"}], "max_tokens": 4}).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
                 + body[: len(body) // 2])
    await writer.drain()
    try:
        await asyncio.wait_for(reader.read(100), timeout=30)
    except (TimeoutError, ConnectionError):
        pass
    writer.close()


async def disconnect(client: httpx.AsyncClient, url: str, key: str) -> None:
    body = {"model": "down", "messages": [{"role": "user", "content": "dcba"}], "max_tokens": 64, "stream": True}
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as r:
            async for _ in r.aiter_lines():
                break                                           # the first event, then gone
    except httpx.HTTPError:
        pass


async def burst(url: str, port: int, n: int, seed: int) -> dict:
    rng = random.Random(seed)
    kinds = ["slow"] * (n // 20) + ["disconnect"] * (n // 20)
    kinds += ["ok"] * (n - len(kinds))
    rng.shuffle(kinds)
    sent = {"ok": 0, "slow": kinds.count("slow"), "disconnect": kinds.count("disconnect"), "by_model": {}}
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        tasks = []
        for kind in kinds:
            if kind == "ok":
                key = rng.choice(["all", "up"])
                model = "up" if key == "up" else rng.choice(["up", "down", "auto", "base"])
                sent["ok"] += 1
                sent["by_model"][model] = sent["by_model"].get(model, 0) + 1
                tasks.append(well_formed(client, url, KEYS[key], model, rng.random() < 0.5))
            elif kind == "slow":
                tasks.append(slow("127.0.0.1", port, KEYS["all"]))
            else:
                tasks.append(disconnect(client, url, KEYS["all"]))
        started = time.perf_counter()
        results = await asyncio.gather(*tasks)
        sent["seconds"] = round(time.perf_counter() - started, 2)
    sent["ok_succeeded"] = sum(1 for kind, r in zip(kinds, results) if kind == "ok" and r)
    return sent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="crma-load-"))
    store = build_store(work)
    keyfile = work / "keys.txt"
    keyfile.write_text(f"{KEYS['all']}\n{KEYS['up']} up\n")
    os.chmod(keyfile, 0o600)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "route.log"
    cmd = [sys.executable, "-m", "crma", "serve", "--store", str(store), "--port", str(port), "--api-key-file",
           str(keyfile), "--route-log", str(log), "--max-queue", str(args.connections + 16),
           "--max-connections", str(args.connections + 32), "--timeout-body", "3", "--log-level", "warning"]
    server = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEYS['all']}"}).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        warmup = asyncio.run(burst(url, port, max(20, args.connections // 10), args.seed + 1))   # every path once
        time.sleep(5)
        before = rss_kib(server.pid)
        sent = asyncio.run(burst(url, port, args.connections, args.seed))
        time.sleep(5)                                   # slow clients' deadlines, cancelled rows retired
        after = rss_kib(server.pid)
        text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEYS['up']}"}).text
    finally:
        server.terminate()
        server.wait(30)
    ok_metric = metric_sum(text, "crma_requests_total", status="200")
    by_model = {m: metric_sum(text, "crma_requests_total", model=m, status="200") for m in sent["by_model"]}
    cancelled = metric_sum(text, "crma_requests_total", status="cancelled")
    lines = len(log.read_text().splitlines()) if log.exists() else 0
    report = {
        "connections": args.connections, "well_formed": sent["ok"], "well_formed_succeeded": sent["ok_succeeded"],
        "slow": sent["slow"], "disconnecting": sent["disconnect"], "burst_seconds": sent["seconds"],
        "rss_before_kib": before, "rss_after_kib": after, "rss_change_pct": round(100 * (after - before) / before, 2),
        "metrics_200": ok_metric, "expected_200": sent["ok"] + warmup["ok"], "warmup": warmup,
        "metrics_200_by_model": by_model, "sent_by_model": sent["by_model"],
        "metrics_cancelled": cancelled, "route_log_lines": lines,
        "checks": {"no_failed_well_formed": sent["ok_succeeded"] == sent["ok"],
                   "memory_within_10pct": abs(after - before) <= 0.10 * before,
                   "metrics_equal_requests": ok_metric == sent["ok"] + warmup["ok"] and all(
                       by_model[m] == n + warmup["by_model"].get(m, 0) for m, n in sent["by_model"].items()),
                   "cancelled_counted": cancelled == sent["disconnect"] + warmup["disconnect"],
                   "route_log_complete": lines == ok_metric + cancelled},
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": sys.version.split()[0]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "serve_load.json", json.dumps(report, indent=2) + "\n")
    held = sum(report["checks"].values())
    md = [f"# Serve load check\n\n`python benchmarks/serve_load.py --connections {args.connections}`: "
          f"{held}/{len(report['checks'])} checks held, burst {sent['seconds']} s on {os.cpu_count()} CPUs "
          f"(load average {os.getloadavg()[0]:.2f} at the end).\n",
          "| check | held | figures |", "|---|---|---|",
          f"| no failed well-formed request | {report['checks']['no_failed_well_formed']} | "
          f"{sent['ok_succeeded']}/{sent['ok']} succeeded; {sent['slow']} slow, {sent['disconnect']} disconnecting "
          f"(warm-up burst of {warmup['ok'] + warmup['slow'] + warmup['disconnect']} before) |",
          f"| memory back within 10% | {report['checks']['memory_within_10pct']} | RSS {before} KiB before, "
          f"{after} KiB after ({report['rss_change_pct']:+.1f}%) |",
          f"| /metrics equals requests sent | {report['checks']['metrics_equal_requests']} | {ok_metric:.0f} "
          f"successes counted, {report['expected_200']} sent (warm-up included) |",
          f"| cancelled streams counted | {report['checks']['cancelled_counted']} | {cancelled:.0f} of "
          f"{sent['disconnect'] + warmup['disconnect']} |",
          f"| routing log complete | {report['checks']['route_log_complete']} | {lines} lines |"]
    write_text(args.out / "serve_load.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
