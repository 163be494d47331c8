"""Decoding benchmark for `crma serve` (issue 23): prints its figures and writes
benchmarks/results/decode_bench.{json,md}.

    .venv/bin/python benchmarks/decode_bench.py --threads 2                # final figures: an idle machine
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decode_bench.py --quick --threads 1   # does it work

SmolLM2-135M (fp32, or --dtype bfloat16) with a CRMA backbone at 3 versions and 16 LoRA adapters
(crma's default LoRA settings, random weights: the arithmetic of trained ones), all in one process,
measured side by side (the compared variants alternate, repeats interleaved):

1. one 16-row decoding step (MixedForward + the preallocated BatchCache): 16 distinct adapters on
   3 backbone versions vs one adapter on one version (ratio), and PEFT's reference path for the former;
   steps of 16, 3 and 1 rows as served (packed oneDNN linear layers and crma's own decoding step,
   crma/serve/linear.py and step.py) against transformers' forward with plain F.linear;
2. throughput of 16 concurrent greedy chat requests through the scheduler over 16 and over 5 adapters,
   mixed batches vs one adapter at a time (`per-adapter`): ratios of generated tokens/s;
3. time to first token p50/p95 of those 16 concurrent chat requests (mixed, 16 adapters), in the steady
   state (a warm-up request per adapter first, so its system-prompt prefix is stored, in both modes);
4. single stream, in rounds (one warm-up round, then 5): one greedy request alone per contender, in
   turn, each through its own scheduler for crma: crma as served (adapter d0 and CRMA), crma on the
   base weights alone (no adapter, no CRMA: the same arithmetic llama.cpp does), and llama.cpp on the
   same weights (an F32 GGUF written from the Q4_1 GGUF crma loads, dequantized) at the same thread
   count, through the npm package node-llama-cpp (a benchmark-only tool, installed with `npm install
   node-llama-cpp @node-llama-cpp/linux-x64` into --llamacpp; skipped when absent); with --half also
   crma in bfloat16 and crma with float16 weights (`--packed-linears float16`), each served and on the
   base weights alone, against an F16 GGUF. A ratio is the median over the rounds of the two
   contenders' ratio in that round (this machine's speed drifts within minutes). Then the Q4_1 GGUF
   itself;
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
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import torch
from bench_stats import load_average, load_line, machine, pct, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crma.config import CRMAConfig, LoraSettings  # noqa: E402
from crma.data import prompt_ids  # noqa: E402
from crma.engine.live import LiveModel  # noqa: E402
from crma.method.adapters import add_adapter  # noqa: E402
from crma.method.models import SMOLLM2_GGUF, load_model, smollm2_dir  # noqa: E402
from crma.serve.batch import BatchCache, new_cache  # noqa: E402
from crma.serve.decoding import SamplingParams  # noqa: E402
from crma.serve.mixed import MixedForward  # noqa: E402
from crma.serve.registry import Registry, Route, Snapshot  # noqa: E402
from crma.serve.scheduler import Request, Scheduler, in_passing_thread  # noqa: E402

QUESTIONS = ["What is a good way to learn a new language?", "Explain photosynthesis in simple terms.",
             "How do I write a function that reverses a list?", "What are the symptoms of the flu?",
             "What does a contract need to be valid?", "How do interest rates affect inflation?",
             "Why is the sky blue?", "Give me three tips for a job interview.", "What is a prime number?",
             "How does a vaccine work?", "What is the difference between weather and climate?",
             "Summarise the plot of Romeo and Juliet.", "How do I make bread at home?",
             "What is machine learning?", "Why do cats purr?", "How far away is the Moon?"]
NODE_SCRIPT = r"""
import {getLlama} from "node-llama-cpp";
const [path, threads, prompt, n] = [process.argv[2], Number(process.argv[3]), process.argv[4], Number(process.argv[5])];
const llama = await getLlama({gpu: false, build: "never", maxThreads: threads});
const model = await llama.loadModel({modelPath: path, gpuLayers: 0});
const context = await model.createContext({threads: {ideal: threads, min: threads}, contextSize: 1024, batchSize: 512});
const runs = [];
for (let r = 0; r < Number(process.argv[6]); r++) {
  const seq = context.getSequence();
  let k = 0, first = 0; const t0 = performance.now();
  for await (const token of seq.evaluate(model.tokenize(prompt, true), {temperature: 0})) {
    if (k === 0) first = performance.now();
    if (++k >= n) break;
  }
  runs.push({prefill_s: (first - t0) / 1000, decode_tok_s: (k - 1) / ((performance.now() - first) / 1000)});
  seq.dispose();
}
console.log(JSON.stringify(runs));
"""


def median(values):
    return statistics.median(values) if values else None




# ---- the model: SmolLM2 + a 3-version backbone + 16 adapters ------------------------------------------
def build(adapters: int, dtype: torch.dtype, seed: int = 0):
    """(live, registry, snapshot) with `adapters` random LoRA adapters d0..dN and backbone versions 1-3."""
    model, tokenizer = load_model("smollm2-135m", dtype=dtype)
    live = LiveModel(model, tokenizer, "smollm2-135m", "modular")
    backbone = live.create_backbone(CRMAConfig())
    gen = torch.Generator().manual_seed(seed)
    states = {}
    with torch.no_grad():
        for v in (1, 2, 3):
            for block in backbone.crma_blocks:
                block.crma_theta.add_(0.5 * torch.randn(block.crma_theta.shape, generator=gen))
                block.crma_gate.fill_(0.02 * v)
            states[v] = {k: t.clone() for k, t in backbone.state_dict().items()}
        for k in range(adapters):
            live.model = add_adapter(live.model, f"d{k}", LoraSettings())
            for name, p in live.model.named_parameters():
                if f".d{k}." in name and "lora_" in name:
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            live.adapters[f"d{k}"] = 1
    live.model.eval()
    registry = Registry(live, None)
    registry.stack = backbone.stack_versions(states)
    routes = {f"d{k}": Route(f"d{k}", f"d{k}", 1, 1 + k % 3) for k in range(adapters)}
    routes["base"] = Route("base", None, None, 3)
    snapshot = Snapshot(None, None, routes, 1, "bench")
    registry.current = snapshot
    return live, registry, snapshot


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


def bench_throughput(live, registry, snap, prompts, max_tokens: int, repeats: int) -> dict:
    """Sections 2 and 3."""
    scheduler = Scheduler(live, registry, max_batch=16, max_queue=64).start()
    out = {}
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
            out[f"{spread} adapters"] = {"runs": runs, "ratio": round(rate["mixed"] / rate["per-adapter"], 3),
                                         "greedy_texts_equal_across_modes": same}
    finally:
        scheduler.stop()
    return out


# ---- 4. single stream ---------------------------------------------------------------------------------
def plain(dtype: torch.dtype):
    """(live, registry, snapshot) of SmolLM2 alone: no adapter, no CRMA backbone (route "base")."""
    model, tokenizer = load_model("smollm2-135m", dtype=dtype)
    live = LiveModel(model, tokenizer, "smollm2-135m", "modular")
    live.model.eval()
    registry = Registry(live, None)
    snapshot = Snapshot(None, None, {"base": Route("base", None, None, None)}, 1, "bench")
    registry.current = snapshot
    return live, registry, snapshot


def single_request(live, registry, snap, model: str, packed: str, prompt: list[int], tokens: int) -> float:
    """Decoding tokens/s of one greedy request alone (first token to last) through a scheduler started for
    it and stopped after it: the thread that runs torch keeps an OpenMP pool while it lives, and pools
    of idle schedulers beside the running one slow it down (docs/serving.md, Threads)."""
    scheduler = Scheduler(live, registry, max_batch=16, packed_linears=packed).start()
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
    registry, snapshot, model, packed_linears)) and `others`' (name -> a callable giving tok/s, or a string: why it did
    not run); one warm-up round of crma's first. Returns every round's tok/s per contender and their
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


# ---- 4. llama.cpp -------------------------------------------------------------------------------------
def float_gguf(src: Path, dst: Path, half: bool = False) -> Path:
    """The GGUF crma loads with every tensor dequantized to F32 (the weights crma computes with), or with
    `half` its matrices in F16 (vectors stay F32, as llama.cpp's converter keeps them)."""
    import numpy as np  # optional: only this comparison needs gguf and numpy
    from gguf import GGUFReader, GGUFValueType, GGUFWriter  # optional
    from gguf.quants import dequantize  # optional
    if dst.exists():
        return dst
    reader = GGUFReader(str(src))
    writer = GGUFWriter(str(dst), arch=reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        value = int(half) if name == "general.file_type" else field.contents()   # 0: all F32, 1: mostly F16
        writer.add_key_value(name, value, kind, field.types[1] if kind == GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        data = data.reshape([int(x) for x in reversed(t.shape.tolist())])
        writer.add_tensor(t.name, data.astype(np.float16) if half and data.ndim > 1 else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def llamacpp(folder: Path, gguf: Path, threads: int, prompt: str, tokens: int, repeats: int) -> dict | str:
    if not (folder / "node_modules" / "node-llama-cpp").is_dir():
        return f"skipped: no node-llama-cpp in {folder}"
    script = folder / "crma_decode_bench.mjs"
    script.write_text(NODE_SCRIPT)
    done = subprocess.run(["node", str(script), str(gguf), str(threads), prompt, str(tokens), str(repeats)],
                          capture_output=True, text=True, cwd=folder, timeout=600)
    if done.returncode != 0:
        return f"failed: {done.stderr.strip()[-300:]}"
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    return {"decode_tok_s": round(median([r["decode_tok_s"] for r in runs]), 2),
            "prefill_s": round(median([r["prefill_s"] for r in runs]), 3), "runs": len(runs)}


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
    mixed = thr["16 adapters"]["runs"]["mixed"]
    lines.append(f"| TTFT, 16 concurrent chat requests (mixed) | p50 {median([r['ttft_p50_s'] for r in mixed])} s, "
                 f"p95 {median([r['ttft_p95_s'] for r in mixed])} s (target p50 <= 1 s) |")
    single = res["single"]
    for name, value in single["tok_s"].items():
        lines.append(f"| single stream, {name} | {value} tok/s |")
    for name, why in single["skipped"].items():
        lines.append(f"| single stream, {name} | {why} |")
    q4 = res["llamacpp_q4_1"]
    q4 = q4 if isinstance(q4, str) else f"{q4['decode_tok_s']} tok/s"
    lines.append(f"| single stream, llama.cpp Q4_1 | {q4} |")
    for name, value in single["ratios"].items():
        if value is not None:
            target = " (target >= 0.8)" if name.startswith(("crma / ", "crma bfloat16 / ",
                                                              "crma float16 weights / ")) else ""
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
    print(json.dumps({k: v["ratio"] for k, v in res["throughput"].items()}, indent=1), flush=True)
    dtype = getattr(torch, args.dtype)
    half = args.half and args.dtype == "float32"
    bf16 = in_passing_thread(lambda: build(16, torch.bfloat16)) if half else None
    if half:
        others = {"bfloat16": (*bf16, "on"), "float16 weights": (live, registry, snap, "float16")}
        res["half"] = in_passing_thread(lambda: bench_agreement((live, registry, snap), others, prompts, max_tokens,
                                                                repeats))
        print(json.dumps(res["half"], indent=1), flush=True)
    base = in_passing_thread(lambda: plain(dtype))
    crma = {"crma": (live, registry, snap, "d0", "on"), "crma, base weights alone": (*base, "base", "on")}
    if half:
        crma |= {"crma bfloat16": (*bf16, "d0", "on"),
                 "crma bfloat16, base weights alone": (*in_passing_thread(lambda: plain(torch.bfloat16)), "base", "on"),
                 "crma float16 weights": (live, registry, snap, "d0", "float16"),
                 "crma float16 weights, base weights alone": (*base, "base", "float16")}
    has_node = (args.llamacpp / "node_modules" / "node-llama-cpp").is_dir()
    q4 = smollm2_dir() / SMOLLM2_GGUF
    ggufs = {"F32": "smollm2-135m-f32.gguf", "F16": "smollm2-135m-f16.gguf"}
    ggufs = {name: float_gguf(q4, args.llamacpp / file, half=name == "F16") if has_node else None
             for name, file in ggufs.items() if name == "F32" or half or args.dtype == "bfloat16"}
    text = tok.decode(prompts[0])

    def llama(gguf: Path | None):
        def run() -> float | str:
            got = llamacpp(args.llamacpp, gguf, args.threads, text, max_tokens, 1)
            return got if isinstance(got, str) else got["decode_tok_s"]
        return run

    others = {f"llama.cpp {name}": llama(gguf) for name, gguf in ggufs.items()}
    res["single"] = bench_single(crma, others, prompts[0], max_tokens, 2 * repeats - 1)
    low = "F32" if args.dtype == "float32" else "F16"
    res["single"]["ratios"] = {f"{a} / {b}": ratio(res["single"], a, b) for a, b in
                               (("crma", f"llama.cpp {low}"), ("crma, base weights alone", f"llama.cpp {low}"),
                                ("crma bfloat16", "llama.cpp F16"),
                                ("crma bfloat16, base weights alone", "llama.cpp F16"),
                                ("crma float16 weights", "llama.cpp F16"),
                                ("crma float16 weights, base weights alone", "llama.cpp F16"))}
    print(json.dumps(res["single"]["tok_s"] | res["single"]["ratios"], indent=1), flush=True)
    res["llamacpp_q4_1"] = (llamacpp(args.llamacpp, q4, args.threads, text, max_tokens, repeats) if has_node
                            else f"skipped: no node-llama-cpp in {args.llamacpp}")
    res["machine"] = machine(args.threads, load_before)
    write_results(args.out, res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
