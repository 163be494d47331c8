"""Where the model is loaded changes how fast the decoding thread runs.

The server decodes on its scheduler thread. An OpenMP thread pool belongs to the thread that started it
and lives as long as that thread; a model loaded on the main thread leaves the main thread's pool
behind. With two pools whose threads outnumber the cores, libgomp stops spinning between parallel
regions, and every one of a decoding step's small regions then waits for a sleeping worker.
`crma serve` therefore loads (and prepares reloads) on a passing thread (`in_passing_thread`).

This script measures one stream (greedy, SmolLM2-135M + CRMA backbone + a LoRA adapter, through the
Scheduler) in two fresh processes: model loaded on the main thread, and on a passing thread.

    python benchmarks/thread_pools.py [--threads N] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from bench_stats import load_average, load_line, machine, write_results
from decode_bench import watch
from decode_models import QUESTIONS, build

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crma.data import prompt_ids  # noqa: E402
from crma.serve.decoding import SamplingParams  # noqa: E402
from crma.serve.scheduler import Request, Scheduler, in_passing_thread  # noqa: E402

VARIANTS = {"main": "model loaded on the main thread", "passing": "model loaded on a passing thread (crma serve)"}


def single_stream(variant: str, threads: int, tokens: int, repeats: int) -> list[float]:
    """Decoding tokens/s of one greedy request at a time through the Scheduler, `repeats` times."""
    torch.set_num_threads(threads)
    live, registry, snap = build(1, torch.float32) if variant == "main" else in_passing_thread(
        lambda: build(1, torch.float32))
    prompt = prompt_ids(live.tokenizer, [{"role": "user", "content": QUESTIONS[0]}])
    scheduler = Scheduler(live, registry, max_batch=16, max_queue=64).start()
    rates = []
    try:
        for _ in range(repeats + 1):                               # the first request warms up
            req = Request(prompt, SamplingParams(max_tokens=tokens, temperature=0.0), "d0", snap)
            stamps: list[float] = []
            ended = watch(req, stamps)
            scheduler.submit(req)
            ended.wait()
            rates.append((req.generated - 1) / (stamps[-1] - req.first_token_at))
    finally:
        scheduler.stop()
    return [round(r, 2) for r in rates[1:]]


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Decoding thread vs where the model was loaded ({m['threads']} torch threads, {m['cpus']} CPUs)",
             "", load_line(m), "",
             "One greedy stream through the Scheduler (SmolLM2-135M fp32, CRMA backbone, one LoRA adapter), "
             f"{res['tokens']} tokens, {res['requests_per_process']} requests per process, "
             "two processes per variant.", "",
             "| model loaded on | tokens/s (each request) | median |", "|---|---|---|"]
    lines += [f"| {VARIANTS[v]} | {', '.join(map(str, r))} | {res['median_tok_s'][v]} |"
              for v, r in res["tok_s"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="few tokens: proves the script works")
    ap.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)     # one process's part
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "thread_pools")
    args = ap.parse_args(argv)
    tokens, repeats = (8, 1) if args.quick else (64, 4)
    if args.variant:
        print(json.dumps(single_stream(args.variant, args.threads, tokens, repeats)))
        return 0
    load_before = load_average()
    res = {"threads": args.threads, "tokens": tokens, "requests_per_process": repeats, "torch": torch.__version__,
           "tok_s": {}}
    for _ in range(2):                                             # alternated, two processes each
        for variant in VARIANTS:
            run = subprocess.run([sys.executable, __file__, "--variant", variant, "--threads", str(args.threads),
                                  *(["--quick"] if args.quick else [])], capture_output=True, text=True, check=True)
            res["tok_s"].setdefault(variant, []).extend(json.loads(run.stdout.strip().splitlines()[-1]))
    res["median_tok_s"] = {v: round(statistics.median(r), 2) for v, r in res["tok_s"].items()}
    res["machine"] = machine(args.threads, load_before)
    write_results(args.out, res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
