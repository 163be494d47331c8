"""How fast can one decoding stream be with torch on this CPU? Prints its figures and writes
benchmarks/results/decode_floor.{json,md}.

    .venv/bin/python benchmarks/decode_floor.py --threads 2               # an idle machine
    .venv/bin/python benchmarks/decode_floor.py --threads 2 --no-compile  # without the slow torch.compile part

SmolLM2-135M in float32, batch 1, one new token per step, all measured side by side in one process:

1. memory read rate: `torch.sum` over one buffer as large as the model's weight matrices (every
   matrix is read once per token, so this bounds any torch decoding step from below);
2. the weights' GEMV floor: every nn.Linear of the model (the tied LM head included) applied once to a
   single row with torch.nn.functional.linear, nothing else, the same with oneDNN's GEMM on weights
   packed once (crma/serve/linear.py), with each block's q|k|v and gate|up packed as one GEMM each, and
   through crma's one-row kernels (crma/serve/gemv.py: inductor-compiled reductions over the model's own
   weights, one per group), which crma's one-row decoding steps use;
3. the plain transformers model (no adapter, no CRMA) decoding greedily with its DynamicCache, eager;
4. the same model under torch.compile(dynamic=True) (inductor): its compile time, its step time, and
   whether its greedy tokens equal eager's;
5. crma's own decoding step (crma/serve/step.py) on the same plain model, with the packed and grouped
   linear layers, the one-row kernels and the batch cache, as `crma serve` decodes, and whether its greedy
   tokens equal eager's; and the same with oneDNN's GEMMs on one row too (`--no-row-gemv`);
6. attention for one query per row over 128 cached columns with SmolLM2's heads, at 1, 3 and 16 rows:
   torch's fused F.scaled_dot_product_attention (boolean mask) against the written-out attention of
   crma's decoding step (crma/serve/step.py `attention`, additive mask), microseconds per call;
7. bfloat16: (2) with the weights in bfloat16 (F.linear, and oneDNN on packed bfloat16 weights), (5)
   on the model in bfloat16, and the attention of (6) over a bfloat16 cache that grows by one column
   per call, as in decoding: over the columns in use, over the whole preallocated buffers with the
   columns past T masked (crma's step in bfloat16), and over float32 copies of the columns in use;
8. float16 weights (`crma serve --packed-linears float16`): (2)'s grouped GEMMs and (5) with the float32
   weights packed as float16 by FBGEMM (crma/serve/linear.py), computed in float32.
9. the GEMVs of (2) one shape at a time (a block's q|k|v, o, gate|up and down projections as crma packs
   them, and the LM head), oneDNN on packed weights, one row: microseconds per call over distinct matrices
   of that shape (at least READ_MB of them, as a step reads its weights from memory, not from a cache) and
   the read rate that makes, at the given thread count and at one thread, beside `torch.sum` over a buffer
   of the same size and crma's one-row kernel over the same matrices (at the given thread count); a line
   through oneDNN's block shapes' (bytes, time) gives the fixed cost of a call and the rate of its
   reading. And what a call costs besides reading: microseconds per call on a 16 x 576 matrix
   (in the cache), oneDNN on packed weights against F.linear (MKL).

crma's single stream (decode_bench.py) adds LoRA and CRMA to (5); (5) sits above (2).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_stats import load_average, load_line, machine, write_results
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parents[1]
READ_MB = 512      # (9): megabytes of distinct matrices per shape, more than any cache holds
sys.path.insert(0, str(ROOT))

from crma.method.models import load_model  # noqa: E402
from crma.serve.batch import BatchCache, new_cache  # noqa: E402
from crma.serve.gemv import RowGemv  # noqa: E402
from crma.serve.linear import Packed, PackedGroup, PackedLinears  # noqa: E402
from crma.serve.step import DecodeStep, attention, fused_groups  # noqa: E402


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `repeats` calls of fn, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def median_ms(fn, repeats: int) -> float:
    return round(1e3 * median_time(fn, repeats), 2)


def decode(forward, config, prompt: torch.Tensor, steps: int) -> tuple[list[int], float]:
    """(greedy tokens, median ms per decoding step) of `forward` (a causal LM or a compiled one)."""
    with torch.inference_mode():
        cache = DynamicCache(config=config)
        out = forward(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
        tokens, times = [int(out.logits[0, -1].argmax())], []
        for _ in range(steps):
            started = time.perf_counter()
            out = forward(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True, logits_to_keep=1)
            tokens.append(int(out.logits[0, -1].argmax()))
            times.append(time.perf_counter() - started)
    return tokens, round(1e3 * statistics.median(times), 2)


def median_us(fn, repeats: int = 500) -> float:
    return round(1e6 * median_time(fn, repeats, warmup=20), 1)


def crma_step(model, prompt: torch.Tensor, steps: int, half: bool = False,
              row_gemv: bool = True) -> tuple[list[int], float]:
    """(greedy tokens, median ms per step) of crma's decoding step (step.py) on the plain model, with the
    packed and grouped linear layers (`half`: float16 weights; `row_gemv`: gemv.py's kernels on one row) and
    the batch cache, as `crma serve` decodes (no adapter, no CRMA)."""
    linears = PackedLinears(half=half, row_gemv=row_gemv)
    linears.install(model, fused_groups)
    step, batch = DecodeStep(model, None, None, linears), BatchCache()
    with torch.inference_mode():
        cache = new_cache(model.config)
        tokens = [int(model(input_ids=prompt, cache=cache, use_cache=True).logits[0, -1].argmax())]
        batch.add(cache, torch.ones_like(prompt), [0])
        times = []
        for _ in range(steps):
            mask, positions = batch.step_inputs()
            started = time.perf_counter()
            logits = step(torch.tensor([[tokens[-1]]]), batch.cache, mask, positions)
            times.append(time.perf_counter() - started)
            tokens.append(int(logits[0].argmax()))
            batch.stepped()
    linears.remove()
    return tokens, round(1e3 * statistics.median(times), 2)


def bench_attention(config, columns: int = 128) -> dict:
    """{rows: (fused, written-out) microseconds per call} for one query per row over `columns` cached
    columns (views of a larger preallocated cache, as served), the first row's first 8 columns padding."""
    kv, heads = config.num_key_value_heads, config.num_attention_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    out = {}
    with torch.inference_mode():
        for b in (1, 3, 16):
            keys, values = (torch.randn(b, kv, 2 * columns, hd)[:, :, :columns] for _ in range(2))
            q = torch.randn(b, kv, heads // kv, hd)
            mask = torch.ones(b, 1, 1, columns, dtype=torch.bool)
            mask[0, ..., :8] = False
            bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
            scale = hd ** -0.5
            fused = median_us(partial(F.scaled_dot_product_attention, q, keys, values, attn_mask=mask, scale=scale))
            written = median_us(partial(attention, q, keys, values, bias, scale))
            out[b] = (fused, written)
    return out


def attend_bf16(how: str, q, keys, values, scale: float, bias, t: int) -> torch.Tensor:
    """crma's attention over the first t columns of a bfloat16 cache: reading those columns ("used"),
    the whole buffers with bias masking the rest ("whole"), or float32 copies of those columns."""
    if how == "whole":
        return attention(q, keys, values, bias, scale)
    keys, values, bias = keys[:, :, :t], values[:, :, :t], bias[..., :t]
    if how == "float32":
        return attention(q.float(), keys.float(), values.float(), bias.float(), scale)
    return attention(q, keys, values, bias, scale)


def bench_attention_bf16(config, columns: int = 128, calls: int = 128) -> dict:
    """{rows: (T columns, whole buffers, float32 copy) microseconds per call}: crma's attention over a
    bfloat16 cache whose length T grows by one column per call from `columns`, as in decoding, reading
    the T columns in use (a new shape at every call), the whole preallocated buffers with the columns
    past T masked (crma's step in bfloat16), or float32 copies of the T columns."""
    kv, heads = config.num_key_value_heads, config.num_attention_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    scale, capacity, out = hd ** -0.5, columns + calls, {}
    with torch.inference_mode():
        for b in (1, 16):
            keys, values = (torch.randn(b, kv, capacity, hd, dtype=torch.bfloat16) for _ in range(2))
            q = torch.randn(b, kv, heads // kv, hd, dtype=torch.bfloat16)
            variants = [partial(attend_bf16, how, q, keys, values, scale) for how in ("used", "whole", "float32")]
            times = []
            for run in variants:
                bias = torch.zeros(b, 1, 1, capacity, dtype=torch.bfloat16)
                started = time.perf_counter()
                for t in range(columns, capacity):
                    bias[..., t:] = float("-inf")
                    run(bias, t)
                    bias[..., t] = 0.0
                times.append(round(1e6 * (time.perf_counter() - started) / calls, 1))
            out[b] = tuple(times)
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    rows = [("memory read (torch.sum over the weights' size)", f"{res['read_ms']} ms ({res['read_gb_s']} GB/s)"),
            (f"every linear once, batch 1 ({res['weights_mb']} MB)", f"{res['gemv_ms']} ms"),
            ("the same, oneDNN GEMMs on packed weights", f"{res['packed_gemv_ms']} ms"),
            ("the same, q\\|k\\|v and gate\\|up one GEMM each", f"{res['grouped_gemv_ms']} ms"),
            ("the same groups, crma's one-row kernels (gemv.py; crma's one-row decoding steps)",
             f"{res['row_gemv_ms']} ms"),
            ("the same with float16 weights (FBGEMM, --packed-linears float16)", f"{res['half_gemv_ms']} ms"),
            ("plain transformers model, eager", f"{res['eager_ms']} ms per token"),
            ("the same model, crma's decoding step (packed, grouped; no adapter, no CRMA)",
             f"{res['crma_step_ms']} ms per token (greedy equal to eager: {res['crma_step_greedy_equal']})"),
            ("the same, oneDNN's GEMMs on one row too (--no-row-gemv)",
             f"{res['onednn_step_ms']} ms per token (greedy equal to eager: {res['onednn_step_greedy_equal']})"),
            ("the same with float16 weights (--packed-linears float16)",
             f"{res['half_step_ms']} ms per token (greedy equal to eager: {res['half_step_greedy_equal']})")]
    if "compiled_ms" in res:
        rows += [("same, torch.compile(dynamic=True)",
                  f"{res['compiled_ms']} ms per token (compile and first run {res['compile_s']} s; "
                  f"greedy equal to eager: {res['compiled_greedy_equal']})"),
                 ("plain transformers model, eager, again after torch.compile (the machine's drift)",
                  f"{res['eager_ms_after']} ms per token")]
    if "bf16" in res:
        v = res["bf16"]
        rows += [("bfloat16: every linear once, batch 1, F.linear", f"{v['gemv_ms']} ms"),
                 ("bfloat16: the same, oneDNN GEMMs on packed weights", f"{v['packed_gemv_ms']} ms"),
                 ("bfloat16: the same, q\\|k\\|v and gate\\|up one GEMM each", f"{v['grouped_gemv_ms']} ms"),
                 ("bfloat16: the same groups, crma's one-row kernels", f"{v['row_gemv_ms']} ms"),
                 ("bfloat16: crma's decoding step on the model in bfloat16 (as (5))",
                  f"{v['crma_step_ms']} ms per token"),
                 ("bfloat16: the same, oneDNN's GEMMs on one row too", f"{v['onednn_step_ms']} ms per token")]
    lines = [f"# Single-stream floor (float32 unless marked, {m['threads']} torch thread(s), {m['cpus']} CPUs)", "",
             load_line(m), "",
             "| figure | value |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows], ""]
    if "attention_us" in res:
        lines += ["Attention, one query per row over 128 cached columns (microseconds per call, one layer):", "",
                  "| rows | torch's fused attention | crma's step (written out) |", "|---|---|---|",
                  *[f"| {b} | {f} | {w} |" for b, (f, w) in res["attention_us"].items()], ""]
    if "gemv_shapes" in res:
        shapes, t = res["gemv_shapes"], m["threads"]
        lines += ["One decoding step's GEMVs one shape at a time, oneDNN on packed weights, one row, over "
                  f"{READ_MB} MB or more of distinct matrices per shape (microseconds per call; GB/s read; "
                  "torch.sum's GB/s over the same bytes):", "",
                  f"| shape (out x in) | in the model | MB each | {t} thread(s): us, GB/s, sum GB/s | "
                  f"1 thread: us, GB/s, sum GB/s | crma's one-row kernel, {t} thread(s): us, GB/s |",
                  "|---|---|---|---|---|---|"]
        for name, v in shapes.items():
            if "count" in v:
                cells = [", ".join(map(str, v["threads"].get(k, v["threads"].get(str(k), ())))) for k in (t, 1)]
                kernel = ", ".join(map(str, v.get("row_kernel", ())))
                lines.append(f"| {name} | {v['count']} | {v['mb']} | {cells[0]} | {cells[1]} | {kernel} |")
        if "fit" in shapes:
            lines += ["", f"A line through the block shapes at {t} thread(s): {shapes['fit']['fixed_us']} us fixed "
                          f"per call, then {shapes['fit']['gb_s']} GB/s."]
        if "small_call_us" in shapes:
            calls = shapes["small_call_us"]
            lines += ["", f"One call on a 16 x 576 matrix in the cache: oneDNN {calls['onednn']} us, F.linear (MKL) "
                          f"{calls['f_linear']} us."]
        lines.append("")
    if "bf16" in res:
        lines += ["Attention over a bfloat16 cache growing by one column per call from 128 to 256, as in "
                  "decoding (microseconds per call, one layer):", "",
                  "| rows | the T columns in use | the whole buffers, masked (crma's step) | "
                  "float32 copies of the T columns |", "|---|---|---|---|",
                  *[f"| {b} | {x} | {w} | {f} |" for b, (x, w, f) in res["bf16"]["attention_us"].items()], ""]
    return "\n".join(lines)


def bench_gemv(model, half: bool = False) -> dict:
    """(2): milliseconds for every nn.Linear of `model` applied once to one row in the model's dtype, with
    F.linear, with oneDNN on packed weights, and with q|k|v and gate|up packed as one GEMM each; `half`
    (a float32 model): the grouped ones with float16 weights (FBGEMM), as `--packed-linears float16`."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dtype = linears[0].weight.dtype
    rows = {m: torch.randn(1, m.in_features, dtype=dtype) for m in linears}
    packed = {m: Packed(m.weight, None) for m in linears}
    layer_groups = fused_groups(model)
    grouped = {id(m) for g in layer_groups for m in g}
    alone = [m for m in linears if id(m) not in grouped]

    def gemv():
        for m in linears:
            F.linear(rows[m], m.weight)

    def packed_gemv():
        for m in linears:
            packed[m](rows[m])

    def grouped_gemv(groups, singles):
        for m in alone:
            singles[m](rows[m])
        for group, x in groups:
            group(x)

    def groups(as_half: bool):
        return [(PackedGroup(g, as_half), torch.randn(1, g[0].in_features, dtype=dtype)) for g in layer_groups]

    kernels = ([(PackedGroup(g, row_gemv=True), torch.randn(1, g[0].in_features, dtype=dtype)) for g in layer_groups],
               {m: Packed(m.weight, None, row=RowGemv((m.weight,), (None,))) for m in alone})
    res = {"gemv_ms": median_ms(gemv, 10), "packed_gemv_ms": median_ms(packed_gemv, 10),
           "grouped_gemv_ms": median_ms(partial(grouped_gemv, groups(False), packed), 10),
           "row_gemv_ms": median_ms(partial(grouped_gemv, *kernels), 10)}
    if half:
        singles = {m: Packed(m.weight, None, half=True) for m in alone}
        res["half_gemv_ms"] = median_ms(partial(grouped_gemv, groups(True), singles), 10)
    return res


def apply_all(packs: list, x: torch.Tensor) -> None:
    for packed in packs:
        packed(x)


def bench_gemv_shapes(model, threads: int) -> dict:
    """(9): {"out x in": {"count": in the model, "mb": each, "threads": {t: (microseconds per call, GB/s,
    torch.sum's GB/s)}}} for each packed GEMM shape of crma's step, one row, over distinct random matrices
    of that shape (READ_MB at least), at `threads` and at one thread; "fit": (fixed microseconds per call,
    GB/s) of a least-squares line through the block shapes' (MB, microseconds) at `threads`."""
    groups = fused_groups(model)
    grouped = {id(m) for g in groups for m in g}
    groups += [(m,) for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in grouped]
    counts = Counter((sum(m.out_features for m in g), g[0].in_features) for g in groups)    # (out, in) -> layers
    res: dict = {}
    with torch.inference_mode():
        for (out, inp), n in counts.items():
            x, mb = torch.randn(1, inp), 4 * out * inp / 1e6
            distinct = max(n, math.ceil(READ_MB / mb))
            weights = [torch.randn(out, inp) * 0.02 for _ in range(distinct)]
            packs = [Packed(w, None) for w in weights]
            buffer = torch.randn(out * inp * distinct)
            row = {}
            for t in sorted({threads, 1}, reverse=True):
                torch.set_num_threads(t)
                us = 1e6 * median_time(partial(apply_all, packs, x), 7) / distinct
                read = 1e6 * median_time(buffer.sum, 7) / distinct
                row[t] = (round(us, 1), round(mb / us * 1e3, 1), round(mb / read * 1e3, 1))
            torch.set_num_threads(threads)
            kernels = [RowGemv((w,), (None,)) for w in weights]
            us = 1e6 * median_time(partial(apply_all, kernels, x), 7) / distinct
            res[f"{out}x{inp}"] = {"count": n, "mb": round(mb, 2), "threads": row,
                                   "row_kernel": (round(us, 1), round(mb / us * 1e3, 1))}
            del weights, packs, kernels, buffer
        weight, x = torch.randn(16, 576), torch.randn(1, 576)
        packed = Packed(weight, None)
        res["small_call_us"] = {"onednn": median_us(partial(packed, x), 2000),
                                "f_linear": median_us(partial(F.linear, x, weight), 2000)}
    blocks = [(v["mb"], v["threads"][threads][0]) for v in res.values() if v.get("count", 0) > 1]
    if len(blocks) > 1:
        mx, my = statistics.fmean(b for b, _ in blocks), statistics.fmean(u for _, u in blocks)
        slope = sum((b - mx) * (u - my) for b, u in blocks) / sum((b - mx) ** 2 for b, _ in blocks)
        res["fit"] = {"fixed_us": round(my - slope * mx, 1), "gb_s": round(1e3 / slope, 1)}
    return res


def bench_bf16(steps: int) -> dict:
    """(7): the GEMV floors of (2) and crma's step of (5) with SmolLM2 in bfloat16, and the attention."""
    model, _ = load_model("smollm2-135m", dtype=torch.bfloat16)
    model.eval()
    res = bench_gemv(model)
    _, res["crma_step_ms"] = crma_step(model, torch.arange(100, 150).unsqueeze(0), steps)
    _, res["onednn_step_ms"] = crma_step(model, torch.arange(100, 150).unsqueeze(0), steps, row_gemv=False)
    res["attention_us"] = bench_attention_bf16(model.config)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=40, help="decoding steps per measurement")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile (minutes)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_floor")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = load_average()
    model, _ = load_model("smollm2-135m", dtype=torch.float32)
    model.eval()
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    buffer = torch.randn(weights)
    res = {"torch": torch.__version__, "weights_mb": round(4 * weights / 1e6, 1)}
    res["read_ms"] = median_ms(buffer.sum, 10)
    res["read_gb_s"] = round(4 * weights / 1e6 / res["read_ms"], 1)
    res |= bench_gemv(model, half=True)
    res["attention_us"] = bench_attention(model.config)
    prompt = torch.arange(100, 150).unsqueeze(0)
    eager_tokens, res["eager_ms"] = decode(model, model.config, prompt, args.steps)
    tokens, res["crma_step_ms"] = crma_step(model, prompt, args.steps)
    res["crma_step_greedy_equal"] = tokens == eager_tokens
    tokens, res["onednn_step_ms"] = crma_step(model, prompt, args.steps, row_gemv=False)
    res["onednn_step_greedy_equal"] = tokens == eager_tokens
    tokens, res["half_step_ms"] = crma_step(model, prompt, args.steps, half=True)
    res["half_step_greedy_equal"] = tokens == eager_tokens
    if args.compile:
        started = time.perf_counter()
        compiled = torch.compile(model, dynamic=True)
        decode(compiled, model.config, prompt, 2)
        res["compile_s"] = round(time.perf_counter() - started, 1)
        tokens, res["compiled_ms"] = decode(compiled, model.config, prompt, args.steps)
        res["compiled_greedy_equal"] = tokens == eager_tokens
        _, res["eager_ms_after"] = decode(model, model.config, prompt, args.steps)   # drift check
    res["gemv_shapes"] = bench_gemv_shapes(model, args.threads)
    res["bf16"] = bench_bf16(args.steps)
    res["machine"] = machine(args.threads, load_before)
    write_results(args.out, res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
