"""Decoding benchmark for `crma serve` (issue 23): prints its figures and writes
benchmarks/results/decode_bench.{json,md}.

    .venv/bin/python benchmarks/decode_bench.py --threads 2                # final figures: an idle machine
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decode_bench.py --quick --threads 1   # does it work

SmolLM2-135M (fp32, or --dtype bfloat16) with a CRMA backbone at 3 versions and 16 LoRA adapters
(decode_models.py), all in one process, measured side by side (the compared variants alternate,
repeats interleaved):

1. one 16-row decoding step (MixedForward + the preallocated BatchCache): 16 distinct adapters on
   3 backbone versions vs one adapter on one version (ratio), and PEFT's reference path for the former;
   steps of 16, 3 and 1 rows as served (packed oneDNN linear layers and crma's own decoding step,
   crma/serve/linear.py and step.py) against transformers' forward with plain F.linear;
2. throughput of 16 concurrent greedy chat requests through the scheduler over 16 and over 5 adapters,
   mixed batches vs one adapter at a time (`per-adapter`): ratios of generated tokens/s. Beside each,
   the ratio's GEMM-only value: what an engine whose decoding steps cost only their linear layers
   would measure, those layers timed alone at the row counts each mode runs (one adapter at a time
   over 5 adapters: 16 requests in groups of 4, 3, 3, 3 and 3 rows, against 16 rows mixed), the sum
   of the groups' times over the 16-row time. Costs outside the GEMMs (prefill, attention, LoRA,
   sampling, per-operator overhead) move the measured ratio either way: toward 5 where they are the
   same for every step, toward 1 where they grow with the rows;
3. time to first token p50/p95 of those 16 concurrent chat requests (mixed, 16 adapters), in the steady
   state (a warm-up request per adapter first, so its system-prompt prefix is stored, in both modes);
4. single stream, in rounds (one warm-up round, then 5): one greedy request alone per contender, in
   turn, each through its own scheduler for crma: crma as served (adapter d0 and CRMA), crma on the base
   weights alone (no adapter, no CRMA: the same arithmetic llama.cpp does), crma with adapter d0 and no
   CRMA, crma as served with oneDNN's GEMMs on its one-row steps (`--no-row-gemv`: what the one-row
   kernels of crma/serve/gemv.py buy); and llama.cpp on the same weights (an F32 GGUF written from the
   Q4_1 GGUF crma loads, dequantized), alone and with adapter d0 written as a llama.cpp LoRA file
   (llamacpp.py; checked first: with the adapter's update scaled up until it changes the text,
   llama.cpp's greedy text equals crma's), at the same thread count, through the npm package
   node-llama-cpp (a benchmark-only tool, installed with `npm install node-llama-cpp
   @node-llama-cpp/linux-x64` into --llamacpp; skipped when absent). With --half also crma in bfloat16
   and crma with float16 weights (`--packed-linears float16`), served, on the base weights alone,
   (bfloat16) with oneDNN on one row and (float16 weights) with the adapter alone, against an F16 GGUF,
   alone and with the adapter. llama.cpp's figure in a round is the median of three generations in one
   process (its speed varies far more than crma's from one generation to the next). A ratio is the
   median over the rounds of the two contenders' ratio in that round (this machine's speed drifts within
   minutes). Then the Q4_1 GGUF itself;
5. with --half: the greedy texts of bfloat16 and of float16 weights against float32's (same adapters
   and backbone versions).

The results record the thread count, the CPU count and the load average before and after the run: a
figure measured on a loaded machine is labelled so and is not a final figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from functools import partial
from pathlib import Path

import torch
from bench_stats import load_average, load_line, machine, pct, write_results
from decode_models import QUESTIONS, build, lora_alone, plain
from llamacpp import float_gguf, installed, llamacpp, lora_gguf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crma.data import prompt_ids  # noqa: E402
from crma.method.models import SMOLLM2_GGUF, smollm2_dir  # noqa: E402
from crma.serve.batch import BatchCache, new_cache  # noqa: E402
from crma.serve.decoding import SamplingParams  # noqa: E402
from crma.serve.mixed import MixedForward, adapter_linears  # noqa: E402
from crma.serve.scheduler import Request, Scheduler, in_passing_thread  # noqa: E402
from crma.serve.step import fused_groups  # noqa: E402


def median(values):
    return statistics.median(values) if values else None


# ---- 1. one 16-row decoding step ----------------------------------------------------------------------
def step_times(live, registry, routes, mixing: str, prompt: list[int], steps: int, fast: bool = True) -> list[float]:
    """Seconds of each of `steps` decoding steps of a batch of len(routes) rows (after their prefills);
    `fast`: the packed linear layers and crma's own decoding step (linear.py, step.py), as served by
    default; else transformers' forward with plain F.linear."""
    forward = MixedForward(live, registry, mixing, packed_linears="on" if fast else "off", decode_step=fast)
    batch = BatchCache()
    with torch.inference_mode():
        for route in routes:
            cache = new_cache(live.model.config)
            forward(torch.tensor([prompt]), [route], cache)
            batch.add(cache, torch.ones(1, len(prompt), dtype=torch.long), [0])
        ids = torch.full((len(routes), 1), prompt[-1])
        times = []
        for _ in range(steps + 1):
            mask, positions = batch.step_inputs()
            started = time.perf_counter()
            forward(ids, routes, batch.cache, mask, positions)
            times.append(time.perf_counter() - started)
            batch.stepped()
    forward.close()
    return times[1:]                                  # the first step gathers the stacks once


def bench_step(live, registry, snap, prompt, steps: int, repeats: int) -> dict:
    mixed = [snap.routes[f"d{k}"] for k in range(16)]              # 16 adapters, versions 1, 2, 3
    one = [snap.routes["d0"]] * 16                                 # one adapter, one version
    runs = {"16 rows, 16 adapters, 3 backbone versions": (mixed, "gather", True),
            "16 rows, 1 adapter, 1 backbone version": (one, "gather", True),
            "16 rows, 16 adapters, PEFT adapter_names (reference)": (mixed, "peft", False),
            "16 rows, 16 adapters, 3 backbone versions, transformers + F.linear": (mixed, "gather", False)}
    for rows in (16, 3, 1):                   # packed linears and crma's step (the default) against neither
        runs[f"{rows} rows, 1 adapter, transformers + F.linear"] = (one[:rows], "gather", False)
        if rows < 16:
            runs[f"{rows} rows, 1 adapter"] = (one[:rows], "gather", True)
    got = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (routes, mixing, fast) in runs.items():
            got[name] += step_times(live, registry, routes, mixing, prompt, steps, fast)
    out = {name: {"median_ms": round(1e3 * median(t), 2), "p10_ms": round(1e3 * pct(t, 0.1), 2),
                  "steps": len(t)} for name, t in got.items()}
    names = list(runs)
    out["ratio_16_vs_1"] = round(out[names[0]]["median_ms"] / out[names[1]]["median_ms"], 3)
    return out


# ---- 5. bfloat16 and float16 weights against float32 ------------------------------------------------------
def greedy(live, registry, route, prompt: list[int], tokens: int, packed: str = "on") -> list[int]:
    """The greedy tokens of one request alone through MixedForward and the batch cache."""
    forward, batch = MixedForward(live, registry, packed_linears=packed), BatchCache()
    with torch.inference_mode():
        cache = new_cache(live.model.config)
        out = [int(forward(torch.tensor([prompt]), [route], cache)[0].argmax())]
        batch.add(cache, torch.ones(1, len(prompt), dtype=torch.long), [0])
        for _ in range(tokens - 1):
            mask, positions = batch.step_inputs()
            out.append(int(forward(torch.tensor([[out[-1]]]), [route], batch.cache, mask, positions)[0].argmax()))
            batch.stepped()
    forward.close()
    return out


def bench_agreement(fp32, others: dict, prompts, tokens: int, repeats: int) -> dict:
    """Greedy agreement with float32 of each of `others` (name -> (live, registry, snapshot, packed_linears)),
    same adapters and backbone versions."""
    prompts = prompts[: 4 if repeats == 1 else 16]
    live, registry, snap = fp32
    want = [greedy(live, registry, snap.routes[f"d{k}"], prompt, tokens) for k, prompt in enumerate(prompts)]
    out = {}
    for name, (live, registry, snap, packed) in others.items():
        agree, first_diff = [], []
        for k, (prompt, a) in enumerate(zip(prompts, want, strict=True)):
            b = greedy(live, registry, snap.routes[f"d{k}"], prompt, tokens, packed)
            agree.append(a == b)
            first_diff.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)))
        out[name] = {"prompts": len(agree), "tokens": tokens, "identical_greedy": sum(agree),
                     "first_difference_median": median(first_diff)}
    return out


# ---- 2./3. concurrent requests through the scheduler -----------------------------------------------------
def watch(req: Request, stamps: list[float] | None = None) -> threading.Event:
    """An event set when `req` ends (done or error), waited on without polling: a polling thread would
    take the GIL and a core slice from the decoding thread's torch threads every few milliseconds."""
    ended = threading.Event()

    def emit(kind, **data):
        if stamps is not None:
            stamps.append(time.perf_counter())
        if kind in ("done", "error"):
            ended.set()
    req.emit = emit
    return ended


def serve(scheduler, snap, jobs: list[tuple[str, list[int]]], max_tokens: int) -> dict:
    reqs = [Request(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0), model, snap) for model, ids in jobs]
    ended = [watch(req) for req in reqs]
    started = time.perf_counter()
    for req in reqs:
        scheduler.submit(req)
    for event in ended:
        event.wait()
    seconds = time.perf_counter() - started
    tokens = sum(r.generated for r in reqs)
    ttft = [r.first_token_at - r.arrived for r in reqs if r.first_token_at]
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2),
            "ttft_p50_s": round(pct(ttft, 0.5), 3), "ttft_p95_s": round(pct(ttft, 0.95), 3),
            "errors": sum(r.errored for r in reqs), "texts": [r.stream.text for r in reqs]}


def gemm_times(live, registry, rows: tuple[int, ...], repeats: int) -> dict[int, float]:
    """Seconds of a decoding step's linear layers alone (the packed GEMMs as crma's step calls them, LM head
    included; no LoRA, CRMA, attention or anything else) on each row count of `rows`, interleaved."""
    forward = MixedForward(live, registry)
    model = live.model
    forward.packed.install(model, fused_groups, adapter_linears)
    grouped = [(forward.packed.group(layers), layers[0].in_features) for layers in fused_groups(model)]
    members = {id(m) for layers in fused_groups(model) for m in layers}
    singles = [(m.forward, m.in_features) for m in forward.packed.modules if id(m) not in members]
    calls = [(g.packed, n) for g, n in grouped] + singles
    got = {m: [] for m in rows}
    with torch.inference_mode():
        inputs = {m: {n: torch.randn(m, n, dtype=model.dtype) for _, n in calls} for m in rows}
        for _ in range(repeats + 1):
            for m in rows:
                started = time.perf_counter()
                for call, n in calls:
                    call(inputs[m][n])
                got[m].append(time.perf_counter() - started)
    forward.close()
    return {m: median(t[1:]) for m, t in got.items()}


def bench_throughput(live, registry, snap, prompts, max_tokens: int, repeats: int) -> dict:
    """Sections 2 and 3."""
    spreads = {16: [1] * 16, 5: [len(range(k, 16, 5)) for k in range(5)]}      # rows per adapter
    gemm = in_passing_thread(lambda: gemm_times(live, registry, (1, 3, 4, 16), 10 * repeats))
    scheduler = Scheduler(live, registry, max_batch=16, max_queue=64).start()
    out = {"gemm_ms": {m: round(1e3 * t, 2) for m, t in gemm.items()}}
    try:                 # steady state: every adapter has read the chat template's system prompt once
        hello = prompt_ids(live.tokenizer, [{"role": "user", "content": "Hello!"}])      # (no other text shared)
        serve(scheduler, snap, [(f"d{k}", hello) for k in range(16)], 1)
        for spread in (16, 5):
            jobs = [(f"d{k % spread}", prompts[k]) for k in range(16)]
            runs = {"mixed": [], "per-adapter": []}
            for _ in range(repeats):
                for mode in runs:
                    scheduler.mode = mode
                    runs[mode].append(serve(scheduler, snap, jobs, max_tokens))
            texts = {mode: [r.pop("texts") for r in rs] for mode, rs in runs.items()}
            same = all(t == texts["mixed"][0] for ts in texts.values() for t in ts)
            rate = {mode: median([r["tokens_per_s"] for r in rs]) for mode, rs in runs.items()}
            gemm_only = sum(gemm[m] for m in spreads[spread]) / gemm[16]    # the same steps, GEMMs alone
            out[f"{spread} adapters"] = {"runs": runs, "ratio": round(rate["mixed"] / rate["per-adapter"], 3),
                                         "gemm_only_ratio": round(gemm_only, 3),
                                         "greedy_texts_equal_across_modes": same}
    finally:
        scheduler.stop()
    return out


# ---- 4. single stream ---------------------------------------------------------------------------------
def check_lora_file(live, registry, snap, prompt: list[int], tokens: int, run_llama, scale: float = 6.0) -> dict:
    """Whether llama.cpp applies the LoRA GGUF as crma applies the adapter: greedy texts with the adapter's
    update scaled by `scale` (B x scale in crma, llama.cpp's adapter scale), large enough to change the
    text; llama.cpp's text is compared over the shorter of the two (it may add a leading newline)."""
    bs = {n: p for n, p in live.model.named_parameters() if ".d0." in n and "lora_B" in n}
    kept = {n: p.detach().clone() for n, p in bs.items()}
    with torch.no_grad():
        for p in bs.values():
            p.mul_(scale)
    try:
        ours = live.tokenizer.decode(greedy(live, registry, snap.routes["d0"], prompt, tokens)).strip()
    finally:
        with torch.no_grad():
            for n, p in bs.items():
                p.copy_(kept[n])
    base = live.tokenizer.decode(greedy(live, registry, snap.routes["base"], prompt, tokens)).strip()
    got = run_llama(scale)
    if isinstance(got, str):
        return {"skipped": got}
    theirs = got["text"].strip()
    k = min(len(ours), len(theirs))
    return {"scale": scale, "same_greedy_text": ours[:k] == theirs[:k], "adapter_changes_text": ours[:k] != base[:k],
            "crma": ours, "llama.cpp": theirs}


def single_request(live, registry, snap, model: str, packed: str, row_gemv: bool, prompt: list[int],
                   tokens: int) -> float:
    """Decoding tokens/s of one greedy request alone (first token to last) through a scheduler started for
    it and stopped after it: the thread that runs torch keeps an OpenMP pool while it lives, and pools
    of idle schedulers beside the running one slow it down (docs/serving.md, Threads)."""
    scheduler = Scheduler(live, registry, max_batch=16, packed_linears=packed, row_gemv=row_gemv).start()
    try:
        req = Request(prompt, SamplingParams(max_tokens=tokens, temperature=0.0), model, snap)
        stamps = []
        ended = watch(req, stamps)
        scheduler.submit(req)
        ended.wait()
    finally:
        scheduler.stop()
    return (req.generated - 1) / (stamps[-1] - req.first_token_at)


def bench_single(crma: dict, others: dict, prompt: list[int], tokens: int, rounds: int) -> dict:
    """Section 4: in each of `rounds` rounds one request per contender, in turn: crma's (name -> (live,
    registry, snapshot, model, packed_linears, row_gemv)) and `others`' (name -> a callable giving tok/s, or a
    string: why it did not run); one warm-up round of crma's first. Returns every round's tok/s per contender and their
    medians."""
    contenders = {name: partial(single_request, *args, prompt, tokens) for name, args in crma.items()} | others
    out = {"rounds": [], "skipped": {}}
    for name in crma:
        contenders[name]()
    for _ in range(rounds):
        got = {}
        for name, run in contenders.items():
            value = run()
            if isinstance(value, str):
                out["skipped"][name] = value
            else:
                got[name] = round(value, 2)
        out["rounds"].append(got)
    out["tok_s"] = {name: median([r[name] for r in out["rounds"] if name in r])
                    for name in contenders if any(name in r for r in out["rounds"])}
    return out


def ratio(single: dict, a: str, b: str) -> float | None:
    """The median over the rounds of a's tok/s over b's (measured minutes apart at most, in turn)."""
    pairs = [r[a] / r[b] for r in single["rounds"] if a in r and b in r]
    return round(median(pairs), 3) if pairs else None


# ---- report -------------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Decoding benchmark ({'quick mode, ' if res['quick'] else ''}{res['dtype']}, "
             f"{m['threads']} torch thread(s), {m['cpus']} CPUs)", "",
             load_line(m), "",
             "| figure | value |", "|---|---|"]
    step = res["step"]
    for name, v in step.items():
        if isinstance(v, dict):
            lines.append(f"| decoding step, {name} | {v['median_ms']} ms (p10 {v['p10_ms']}) |")
    lines.append(f"| 16-row step, 16 adapters vs 1 | **{step['ratio_16_vs_1']}x** (target <= 1.10) |")
    thr = res["throughput"]
    for spread, target in (("16 adapters", 6), ("5 adapters", 3.5)):
        v = thr[spread]
        rates = {mode: median([r["tokens_per_s"] for r in runs]) for mode, runs in v["runs"].items()}
        lines.append(f"| 16 requests over {spread}: mixed vs one adapter at a time | {rates['mixed']:.1f} vs "
                     f"{rates['per-adapter']:.1f} tok/s: **{v['ratio']}x** (target >= {target}) |")
        lines.append(f"| the same if a step cost only its linear layers (GEMM-only ratio) | "
                     f"{v['gemm_only_ratio']}x |")
    gemm = ", ".join(f"{m} row{'s' * (m != 1)} {t} ms" for m, t in thr["gemm_ms"].items())
    lines.append(f"| a decoding step's linear layers alone | {gemm} |")
    mixed = thr["16 adapters"]["runs"]["mixed"]
    lines.append(f"| TTFT, 16 concurrent chat requests (mixed) | p50 {median([r['ttft_p50_s'] for r in mixed])} s, "
                 f"p95 {median([r['ttft_p95_s'] for r in mixed])} s (target p50 <= 1 s) |")
    single = res["single"]
    for name, value in single["tok_s"].items():
        lines.append(f"| single stream, {name} | {value} tok/s |")
    for name, why in single["skipped"].items():
        lines.append(f"| single stream, {name} | {why} |")
    check = res.get("lora_file", {})
    if "scale" in check:
        lines.append(f"| llama.cpp's LoRA file checked: greedy text with the update x{check['scale']} equal to crma's "
                     f"| {check['same_greedy_text']} (the update changes the text: {check['adapter_changes_text']}) |")
    q4 = res["llamacpp_q4_1"]
    q4 = q4 if isinstance(q4, str) else f"{q4['decode_tok_s']} tok/s"
    lines.append(f"| single stream, llama.cpp Q4_1 | {q4} |")
    for name, value in single["ratios"].items():
        if value is not None:
            target = " (target >= 0.8)" if name in ("crma / llama.cpp F32", "crma / llama.cpp F16",
                                                    "crma bfloat16 / llama.cpp F16",
                                                    "crma float16 weights / llama.cpp F16") else ""
            lines.append(f"| {name}, median of {len(single['rounds'])} rounds | **{value:.2f}x**{target} |")
    for name, v in res.get("half", {}).items():
        lines.append(f"| {name} vs float32: identical greedy texts | {v['identical_greedy']} of {v['prompts']} "
                     f"({v['tokens']} tokens; first difference at token {v['first_difference_median']}, median) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few steps and tokens: proves the script works")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and llama.cpp threads")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--half", action="store_true", help="also: the speed of bfloat16 and of float16 weights "
                                                        "(--packed-linears float16), and their greedy agreement "
                                                        "with float32")
    ap.add_argument("--llamacpp", type=Path, default=Path("/tmp/llamacpp"), help="folder with node-llama-cpp")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_bench")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps, repeats, max_tokens = (5, 1, 12) if args.quick else (20, 3, 64)
    load_before = load_average()
    # torch work off the main thread, as crma serve does (crma/serve/scheduler.py in_passing_thread): an
    # OpenMP pool left on the main thread slows the scheduler's thread (benchmarks/thread_pools.py)
    live, registry, snap = in_passing_thread(lambda: build(16, getattr(torch, args.dtype)))
    tok = live.tokenizer
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    res = {"quick": args.quick, "dtype": args.dtype, "torch": torch.__version__}
    res["step"] = in_passing_thread(lambda: bench_step(live, registry, snap, prompts[0], steps, repeats))
    print(json.dumps(res["step"], indent=1), flush=True)
    res["throughput"] = bench_throughput(live, registry, snap, prompts, max_tokens, repeats)
    print(json.dumps({k: v if k == "gemm_ms" else (v["ratio"], v["gemm_only_ratio"])
                      for k, v in res["throughput"].items()}, indent=1), flush=True)
    dtype = getattr(torch, args.dtype)
    half = args.half and args.dtype == "float32"
    bf16 = in_passing_thread(lambda: build(16, torch.bfloat16)) if half else None
    if half:
        others = {"bfloat16": (*bf16, "on"), "float16 weights": (live, registry, snap, "float16")}
        res["half"] = in_passing_thread(lambda: bench_agreement((live, registry, snap), others, prompts, max_tokens,
                                                                repeats))
        print(json.dumps(res["half"], indent=1), flush=True)
    base = in_passing_thread(lambda: plain(dtype))
    alone = in_passing_thread(lambda: lora_alone(live, dtype))
    crma = {"crma": (live, registry, snap, "d0", "on", True), "crma, base weights alone": (*base, "base", "on", True),
            "crma, LoRA alone": (*alone, "d0", "on", True),
            "crma, one row by oneDNN": (live, registry, snap, "d0", "on", False)}
    if half:
        crma |= {"crma bfloat16": (*bf16, "d0", "on", True),
                 "crma bfloat16, base weights alone": (*in_passing_thread(lambda: plain(torch.bfloat16)), "base", "on",
                                                       True),
                 "crma bfloat16, one row by oneDNN": (*bf16, "d0", "on", False),
                 "crma float16 weights": (live, registry, snap, "d0", "float16", True),
                 "crma float16 weights, base weights alone": (*base, "base", "float16", True),
                 "crma float16 weights, LoRA alone": (*alone, "d0", "float16", True)}
    has_node = installed(args.llamacpp)
    q4 = smollm2_dir() / SMOLLM2_GGUF
    ggufs = {"F32": "smollm2-135m-f32.gguf", "F16": "smollm2-135m-f16.gguf"}
    ggufs = {name: float_gguf(q4, args.llamacpp / file, half=name == "F16") if has_node else None
             for name, file in ggufs.items() if name == "F32" or half or args.dtype == "bfloat16"}
    lora = lora_gguf(alone[0].model, "d0", args.llamacpp / "lora_d0.gguf") if has_node else None
    text = tok.decode(prompts[0])

    def llama(gguf: Path | None, adapter: Path | None = None):
        def run() -> float | str:
            got = llamacpp(args.llamacpp, gguf, args.threads, text, max_tokens, repeats, adapter)
            return got if isinstance(got, str) else got["decode_tok_s"]
        return run

    others = {f"llama.cpp {name}": llama(gguf) for name, gguf in ggufs.items()}
    others |= {f"llama.cpp {name} + LoRA": llama(gguf, lora) for name, gguf in ggufs.items() if dtype == torch.float32}
    if has_node and dtype == torch.float32:
        res["lora_file"] = in_passing_thread(lambda: check_lora_file(
            *alone, prompts[0], 32, lambda scale: llamacpp(args.llamacpp, ggufs["F32"], args.threads, text, 32, 1,
                                                           lora, scale)))
    res["single"] = bench_single(crma, others, prompts[0], max_tokens, 2 * repeats - 1)
    low = "F32" if args.dtype == "float32" else "F16"
    res["single"]["ratios"] = {f"{a} / {b}": ratio(res["single"], a, b) for a, b in
                               (("crma", f"llama.cpp {low}"), ("crma, base weights alone", f"llama.cpp {low}"),
                                ("crma, one row by oneDNN", f"llama.cpp {low}"),
                                ("crma, LoRA alone", "llama.cpp F32 + LoRA"), ("crma", "llama.cpp F32 + LoRA"),
                                ("crma bfloat16", "llama.cpp F16"),
                                ("crma bfloat16, base weights alone", "llama.cpp F16"),
                                ("crma bfloat16, one row by oneDNN", "llama.cpp F16"),
                                ("crma float16 weights", "llama.cpp F16"),
                                ("crma float16 weights, base weights alone", "llama.cpp F16"),
                                ("crma float16 weights, LoRA alone", "llama.cpp F16 + LoRA"))}
    print(json.dumps(res["single"]["tok_s"] | res["single"]["ratios"], indent=1), flush=True)
    q4_run = llamacpp(args.llamacpp, q4, args.threads, text, max_tokens, repeats) if has_node else None
    res["llamacpp_q4_1"] = q4_run or f"skipped: no node-llama-cpp in {args.llamacpp}"
    res["machine"] = machine(args.threads, load_before)
    write_results(args.out, res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
