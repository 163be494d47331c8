"""Serving benchmark for `crma serve` (issue 9): prints its figures and writes them as JSON.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_bench.py --store /tmp/serve-store \
        --out benchmarks/results/serve/serve_bench.json

The store must hold the 5 cl5 domains on smollm2-135m (see SERVE_NOTES.md for the `crma add` loop that
builds one in a few minutes). In one process and one run, against a live server on 127.0.0.1:

1. throughput: N concurrent streaming chat requests spread round-robin over the 5 adapters, greedy,
   with the scheduler batching across adapters (`mixed`, LoRA by PEFT's adapter_names), only one
   adapter (and backbone version) per batch (`per-adapter`), and across adapters with the default
   `--lora-mixing gather` (`mixed-gather`), in turn `--repeats` times; ratios of generated tokens/s;
2. latency of the mixed runs: time to first token (client side, first non-empty content chunk) and
   per-token latency (per request: (last - first content chunk) / (completion tokens - 1)), p50/p95;
3. single-request decoding tokens/s through the server beside plain transformers `generate` on the
   same model in the same process: the same adapter and the same backbone version (`generate` with
   the adapter active and the backbone's precomputed operators, the scheduler's math), plus `generate`
   as `crma generate` runs it (backbone recomputed every step) and on the bare base model;
4. reload time while requests flow: the store's manifest as it was before its last `crma add` (that
   domain disappears), then as it is (the domain appears: its adapter read, checksummed and loaded),
   each picked up through POST /admin/reload; failed requests counted. The manifest is restored.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from bench_stats import pct

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crma.data import prompt_ids  # noqa: E402
from crma.serve.app import create_app  # noqa: E402
from crma.serve.config import ServeConfig  # noqa: E402
from crma.serve.server import Server  # noqa: E402

DOMAINS = ["medical", "legal", "finance", "code", "science"]
TOKEN = "bench"




def start(server: Server):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", uv, thread


def queries(corpus: Path, n: int) -> list[tuple[str, str]]:
    """n (domain, query) pairs, round-robin over the domains (cl5 queries.jsonl)."""
    per = {d: [json.loads(line)["text"] for line in open(corpus / d / "queries.jsonl", encoding="utf-8")]
           for d in DOMAINS}
    return [(DOMAINS[k % 5], per[DOMAINS[k % 5]][k // 5]) for k in range(n)]


async def one(client, domain: str, text: str, max_tokens: int) -> dict:
    sent = time.perf_counter()
    stream = await client.chat.completions.create(
        model=domain, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True})
    times, tokens, text = [], 0, []
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
            text.append(chunk.choices[0].delta.content)
    return {"sent": sent, "times": times, "tokens": tokens, "text": "".join(text)}


async def burst(url: str, jobs, max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=3600) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(client, d, q, max_tokens) for d, q in jobs))
        wall = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["times"][0] - r["sent"] for r in results if r["times"]]
    tpot = [(r["times"][-1] - r["times"][0]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1 and r["times"]]
    return {"requests": len(jobs), "tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "ttft_s": ttft, "per_token_s": tpot, "texts": [r["text"] for r in results]}


class Stamps:
    """A transformers streamer that records when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times, self.calls = [], 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_generate(server: Server, ids: torch.Tensor, domain: str | None, how: str, n: int) -> dict:
    """transformers generate on the server's own model, run in the scheduler's thread between steps."""
    from contextlib import ExitStack

    from crma.method.adapters import active

    live, reg = server.live, server.registry
    route = reg.current.routes[domain or "base"]

    def run():
        stamps = Stamps()
        with ExitStack() as stack, torch.inference_mode():
            if how == "same-math":              # the adapter active, the backbone's precomputed operators
                stack.enter_context(active(live.model, route.adapter))
                stack.enter_context(live.backbone.per_row(reg.stack, reg.stack.rows([route.backbone_version])))
            elif how == "crma-generate":        # what `crma generate` does: backbone recomputed every step
                stack.enter_context(active(live.model, route.adapter))
                live.set_backbone(route.backbone_version)
            else:                               # the untouched base model
                stack.enter_context(live.untouched())
            t = time.perf_counter()
            out = live.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                      do_sample=False, temperature=None, top_p=None, top_k=None,
                                      pad_token_id=live.tokenizer.pad_token_id, streamer=stamps)
            total = time.perf_counter() - t
        new = out.shape[1] - ids.shape[1]
        decode = (stamps.times[-1] - stamps.times[0]) / (new - 1) if new > 1 else None
        return {"tokens": int(new), "seconds": round(total, 3),
                "decode_tokens_per_s": round(1 / decode, 2) if decode else None,
                "end_to_end_tokens_per_s": round(new / total, 2),
                "text": live.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)}

    return server.scheduler.call(run).result()


async def server_single(url: str, domain: str, text: str, n: int) -> dict:
    r = await burst(url, [(domain, text)], n)
    tokens = r["tokens"]
    decode = r["per_token_s"][0] if r["per_token_s"] else None
    return {"tokens": tokens, "seconds": r["seconds"], "decode_tokens_per_s": round(1 / decode, 2) if decode else None,
            "end_to_end_tokens_per_s": round(tokens / r["seconds"], 2), "ttft_s": round(r["ttft_s"][0], 4),
            "text": r["texts"][0]}


def before_last_add(manifest: dict) -> dict:
    """The manifest as it was before the store's last `crma add` (versions are immutable, so this is
    exactly the earlier state): that domain, its backbone and router versions, its log entry gone."""
    m = copy.deepcopy(manifest)
    last = [e for e in m["log"] if e["op"] == "add"][-1]
    domain = last["domain"]
    meta = m["adapters"][domain][str(m["domains"][domain]["current"])]
    if len(m["adapters"][domain]) != 1:
        raise SystemExit(f"{domain} has several versions; the reload phase needs a store built by one add per domain")
    del m["domains"][domain], m["adapters"][domain]
    if meta.get("backbone_version"):
        bb = m["backbone"]["versions"].pop(str(meta["backbone_version"]))
        m["backbone"]["current"] = bb["parent"]
    del m["router"]["versions"][str(meta["router_version"])]
    m["router"]["current"] = max(int(v) for v in m["router"]["versions"])
    m["log"].remove(last)
    return m


async def reload_under_traffic(url: str, store: Path) -> dict:
    """While requests flow: the store goes back to before its last add (that domain disappears), then
    forward again (it appears: its adapter is read, checksummed and loaded), each via /admin/reload."""
    import httpx
    from openai import AsyncOpenAI

    manifest = store / "manifest.json"
    original = manifest.read_bytes()
    earlier = before_last_add(json.loads(original))
    stop, outcomes = asyncio.Event(), {"ok": 0, "failed": []}
    served = [d for d in DOMAINS if d in earlier["domains"]]

    async def traffic(k):
        async with AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600) as client:
            while not stop.is_set():
                try:
                    await client.chat.completions.create(model=served[k % len(served)], max_tokens=8, temperature=0,
                                                         messages=[{"role": "user", "content": "Define the term."}])
                    outcomes["ok"] += 1
                except Exception as err:                      # noqa: BLE001
                    outcomes["failed"].append(repr(err))

    def write(data: bytes) -> None:                           # what a writer's commit does
        tmp = manifest.with_suffix(".bench-tmp")
        tmp.write_bytes(data)
        os.replace(tmp, manifest)

    async def reload() -> dict:
        async with httpx.AsyncClient(timeout=600) as http:
            t = time.perf_counter()
            resp = await http.post(url + "/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
            wall = time.perf_counter() - t
        body = resp.json()
        return {"status": resp.status_code, "wall_s": round(wall, 3), "server_s": body.get("seconds"),
                "models": body.get("models")}

    workers = [asyncio.create_task(traffic(k)) for k in range(4)]
    await asyncio.sleep(2)
    try:
        write(json.dumps(earlier, indent=2).encode() + b"\n")
        removed = await reload()
        await asyncio.sleep(2)
        write(original)
        added = await reload()
        await asyncio.sleep(2)
    finally:
        stop.set()
        await asyncio.gather(*workers)
        if manifest.read_bytes() != original:
            write(original)
    return {"remove_domain": removed, "add_domain": added, "requests_ok": outcomes["ok"],
            "requests_failed": len(outcomes["failed"]), "failures": outcomes["failed"][:5]}


def summary(values, digits=4):
    return {"p50": round(pct(values, 0.5), digits), "p95": round(pct(values, 0.95), digits), "n": len(values)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, default=ROOT / "benchmarks/corpora/cl5")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--single-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    t = time.perf_counter()
    server = Server.open(ServeConfig(store=args.store, admin_token=TOKEN, max_batch=args.requests,
                                     max_queue=4 * args.requests, threads=args.threads))
    load_s = time.perf_counter() - t
    url, uv, thread = start(server)
    print(f"server up in {load_s:.1f}s: {', '.join(server.registry.current.models())}; torch threads {args.threads}; "
          f"load average {load_before[0]:.1f}", flush=True)
    jobs = queries(args.corpus, args.requests)
    asyncio.run(burst(url, [(d, "Hello") for d in DOMAINS], 4))                      # warm up

    runs = {"mixed": [], "per-adapter": [], "mixed-gather": []}
    st = server.scheduler.stats
    for rep in range(args.repeats):
        for mode in runs:
            server.scheduler.mode = "per-adapter" if mode == "per-adapter" else "mixed"
            server.scheduler.forward.lora_mixing = "gather" if mode == "mixed-gather" else "peft"
            before = dict(st)
            r = asyncio.run(burst(url, jobs, args.max_tokens))
            r["prefill_seconds"] = round(st["prefill_seconds"] - before["prefill_seconds"], 3)
            r["decode_step_seconds"] = round(st["step_seconds"] - before["step_seconds"], 3)
            r["decode_step_tokens"] = st["step_tokens"] - before["step_tokens"]
            r["decode_steps"] = st["steps"] - before["steps"]
            r["decode_tokens_per_s"] = round(r["decode_step_tokens"] / r["decode_step_seconds"], 2)
            runs[mode].append(r)
            print(f"[{rep + 1}/{args.repeats}] {mode:>11}: {r['tokens']} tokens in {r['seconds']:.1f}s = "
                  f"{r['tokens_per_s']:.1f} tokens/s (prefills {r['prefill_seconds']:.1f}s; decoding steps "
                  f"{r['decode_tokens_per_s']:.1f} tokens/s over {r['decode_steps']} steps)", flush=True)
    server.scheduler.mode, server.scheduler.forward.lora_mixing = "mixed", "gather"
    tps = {m: statistics.median(r["tokens_per_s"] for r in rs) for m, rs in runs.items()}
    ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["mixed"], runs["per-adapter"])]
    decode_ratios = [a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                     for a, b in zip(runs["mixed"], runs["per-adapter"])]
    g_ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["mixed-gather"], runs["per-adapter"])]
    g_decode = [a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                for a, b in zip(runs["mixed-gather"], runs["per-adapter"])]
    ttft = [x for r in runs["mixed"] for x in r["ttft_s"]]
    tpot = [x for r in runs["mixed"] for x in r["per_token_s"]]
    ttft_pa = [x for r in runs["per-adapter"] for x in r["ttft_s"]]

    # single request: server vs transformers generate, interleaved
    domain, text = "medical", jobs[0][1]
    ids = torch.tensor([prompt_ids(server.tokenizer, [{"role": "user", "content": text}])])   # as the server
    single = {"server": [], "generate_same_math": [], "generate_crma_generate": [], "generate_base_model": []}
    for rep in range(3):
        single["generate_same_math"].append(hf_generate(server, ids, domain, "same-math", args.single_tokens))
        single["server"].append(asyncio.run(server_single(url, domain, text, args.single_tokens)))
        print(f"[{rep + 1}/3] single request: server {single['server'][-1]['decode_tokens_per_s']} tokens/s, "
              f"generate {single['generate_same_math'][-1]['decode_tokens_per_s']} tokens/s (decoding)", flush=True)
    single["generate_crma_generate"].append(hf_generate(server, ids, domain, "crma-generate", args.single_tokens))
    single["generate_base_model"].append(hf_generate(server, ids, None, "base", args.single_tokens))
    same_text = [a["text"] == b["text"] for a, b in zip(single["server"], single["generate_same_math"])]
    for rows in single.values():
        for row in rows:
            row.pop("text", None)
    mixed_equal = [r["texts"] == runs["mixed"][0]["texts"] for rs in runs.values() for r in rs]
    for rs in runs.values():
        for r in rs:
            r.pop("texts")
    med = {k: statistics.median(r["decode_tokens_per_s"] for r in v) for k, v in single.items()}

    reload = asyncio.run(reload_under_traffic(url, args.store))
    stats = dict(server.scheduler.stats)
    uv.should_exit = True
    thread.join(30)

    result = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/serve_bench.py "
                   + " ".join(sys.argv[1:]),
        "model": server.live.spec, "domains": DOMAINS, "torch_threads": args.threads, "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "torch": torch.__version__,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "server_load_seconds": round(load_s, 2),
        "throughput": {"requests": args.requests, "max_tokens": args.max_tokens, "runs": {
            m: [{k: v for k, v in r.items() if k not in ("ttft_s", "per_token_s")} for r in rs]
            for m, rs in runs.items()},
            "mixed_tokens_per_s_median": tps["mixed"], "per_adapter_tokens_per_s_median": tps["per-adapter"],
            "ratio_per_repeat": [round(x, 2) for x in ratios], "ratio_median": round(statistics.median(ratios), 2),
            "target_ratio": 3.0,
            "decode_steps_ratio_per_repeat": [round(x, 2) for x in decode_ratios],
            "decode_steps_ratio_median": round(statistics.median(decode_ratios), 2),
            "mixed_gather_tokens_per_s_median": tps["mixed-gather"],
            "gather_ratio_per_repeat": [round(x, 2) for x in g_ratios],
            "gather_ratio_median": round(statistics.median(g_ratios), 2),
            "gather_decode_steps_ratio_median": round(statistics.median(g_decode), 2),
            "note": "ratio: end to end (prefills included); decode_steps_ratio: "
                    "tokens per second of the decoding steps alone (scheduler counters); mixed: LoRA by PEFT's "
                    "adapter_names (--lora-mixing peft, the reference); mixed-gather: --lora-mixing gather "
                    "(stacked weights per row, the default)"},
        "latency_mixed": {"ttft_s": summary(ttft), "per_token_s": summary(tpot)},
        "latency_per_adapter": {"ttft_s": summary(ttft_pa)},
        "single_request": {"max_tokens": args.single_tokens, "runs": single,
                           "decode_tokens_per_s_median": med,
                           "server_vs_generate_same_math": round(med["server"] / med["generate_same_math"], 3),
                           "target": "within 10% (>= 0.90)", "server_text_equals_generate": same_text},
        "greedy_outputs_identical_across_runs_and_modes": all(mixed_equal),
        "reload": reload, "scheduler_stats": stats,
    }
    print()
    print(f"throughput, {args.requests} concurrent requests over 5 adapters ({args.max_tokens} tokens max each):")
    print(f"  mixed-adapter batches   {tps['mixed']:7.1f} tokens/s (median of {args.repeats}; "
          "LoRA by PEFT adapter_names)")
    print(f"  one adapter at a time   {tps['per-adapter']:7.1f} tokens/s")
    print(f"  ratio                   {statistics.median(ratios):7.2f}x   (per repeat: "
          f"{', '.join(f'{x:.2f}' for x in ratios)}; target >= 3x)")
    print(f"  decoding steps alone    {statistics.median(decode_ratios):7.2f}x   (per repeat: "
          f"{', '.join(f'{x:.2f}' for x in decode_ratios)}; prefills excluded)")
    print(f"  mixed, --lora-mixing gather {tps['mixed-gather']:7.1f} tokens/s: {statistics.median(g_ratios):.2f}x "
          f"(per repeat {', '.join(f'{x:.2f}' for x in g_ratios)}); "
          f"decoding steps alone {statistics.median(g_decode):.2f}x")
    print(f"latency (mixed): TTFT p50 {pct(ttft, .5):.3f}s p95 {pct(ttft, .95):.3f}s; "
          f"per token p50 {pct(tpot, .5) * 1000:.0f} ms p95 {pct(tpot, .95) * 1000:.0f} ms")
    print(f"single request decoding: server {med['server']:.2f} tokens/s, transformers generate (same math) "
          f"{med['generate_same_math']:.2f} -> {med['server'] / med['generate_same_math']:.3f}x (target >= 0.90); "
          f"`crma generate` path {med['generate_crma_generate']:.2f}, bare base model {med['generate_base_model']:.2f}")
    print(f"greedy texts: server == transformers generate {same_text}; "
          f"identical in every throughput run: {all(mixed_equal)}")
    print(f"reload under traffic: remove a domain {reload['remove_domain']['wall_s']}s, add a domain "
          f"{reload['add_domain']['wall_s']}s; requests ok {reload['requests_ok']}, failed {reload['requests_failed']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
