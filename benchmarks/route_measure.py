"""Measure routers on the cl5 corpus without training any adapter: features, background class, calibration.

For each variant, builds a 5-domain router the way a store does (crma.routing.new_router + update_router
on each domain's train.jsonl; thresholds calibrated on a held-back slice of train, or with --calib pool on
pool.jsonl: never on holdout documents, which cl5's queries.jsonl come from), then routes:

  labelled   cl5 queries.jsonl (the target), and plain questions written for this check in
             benchmarks/route_sets/questions_{dev,heldout}/<domain>.txt (other genre than the corpus)
  to base    random character strings, non-English lines (route_sets/non_english_{dev,heldout}.txt),
             everyday English (route_sets/everyday_{dev,heldout}.txt: none of it from the background source)
  demo       a 3-domain router from crma/demo_data train passages (30 each): its queries and the issue's
             four questions

`dev` sets were looked at while choosing the design. `heldout` sets were run for the final numbers of two
configurations (400 and 100 passages per domain) before the default (100) was chosen, so they are not blind to
that choice; `heldout2` sets were written after that and run once, on the default only.
Also: single-query latency on one thread (wall and this thread's CPU time), encoder load time and memory,
and a check that no calibration passage shares a doc_id with an evaluation query.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/route_measure.py --corpus benchmarks/corpora/cl5 \\
        --variants minilm --out benchmarks/results/router/minilm.json
Variants: minilm (default router), minilm-sentence (sentence embedding only, mix_layer -1),
minilm-nobg (no background class), smollm2-l6 (SmolLM2-135M block-6 hidden state, the previous router).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import string
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crma.routing.route_eval import read_queries  # noqa: E402

from crma.data import read_texts  # noqa: E402
from crma.routing import BASE, RouterConfig, new_router, route_texts, update_router  # noqa: E402

DOMAINS = ("medical", "legal", "finance", "code", "science")
SETS = ROOT / "benchmarks" / "route_sets"
DEMO = ROOT / "crma" / "demo_data"
FOUR = {"How long should I knead bread dough?": "cooking", "What is a red giant star?": "astronomy",
        "The lessee shall indemnify the lessor against all claims.": "contracts",
        "Who won the football match yesterday?": BASE}
VARIANTS = {
    "minilm": {},
    "minilm-sentence": {"mix_layer": -1},
    "minilm-nobg": {"background": "none"},
    "smollm2-l6": {"encoder": "base", "layer": 6},
}


def eval_random_strings(n: int, seed: int) -> list[str]:
    """The route-eval generator (crma.routing.route_eval.random_strings), another seed than the noise gate's."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "      "
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(10, 200))).strip() or "x" for _ in range(n)]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


COLD = """
import resource, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
from crma.routing.encoders import minilm
t1 = time.perf_counter()
enc = minilm()
t2 = time.perf_counter()
enc.encode(["How long should I knead bread dough?"], 64, 1, 3)
t3 = time.perf_counter()
for _ in range(20):
    enc.encode(["What is a red giant star?"], 64, 1, 3)
print({"import_s": t1 - t0, "load_s": t2 - t1, "first_query_s": t3 - t2, "parameters": enc.n_params,
       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
"""


def cold_start() -> dict:
    """A fresh process: import crma's encoder module (torch, transformers), load MiniLM, route a first query;
    peak memory of that process (what a server adds for the router's encoder, torch included)."""
    import ast
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", COLD], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    base = subprocess.run([sys.executable, "-c", "import resource, torch, transformers; "
                           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                          capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    res = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    res["peak_rss_mb_torch_transformers_only"] = float(base.stdout.strip().splitlines()[-1])
    res["rss_mb_for_minilm"] = res["peak_rss_mb"] - res["peak_rss_mb_torch_transformers_only"]
    return res


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def route_all(router, model, tok, texts: list[str]) -> list:
    return route_texts(router, model, tok, texts, batch_size=32)


def accuracy(router, model, tok, sets: dict[str, list[str]]) -> dict:
    out, correct, n, reasons = {}, 0, 0, {}
    for d, texts in sets.items():
        dec = route_all(router, model, tok, texts)
        c = sum(x.domain == d for x in dec)
        out[d] = {"n": len(texts), "correct": c, "accuracy_pct": 100 * c / len(texts),
                  "to_base": sum(x.domain == BASE for x in dec),
                  "misrouted_to": {k: sum(x.domain == k for x in dec) for k in set(x.domain for x in dec) - {d}}}
        for x in dec:
            if x.domain == BASE:
                reasons[x.reason] = reasons.get(x.reason, 0) + 1
        correct += c
        n += len(texts)
    return {"accuracy_pct": 100 * correct / n, "n": n, "per_domain": out, "abstain_reasons": reasons}


def to_base(router, model, tok, sets: dict[str, list[str]]) -> dict:
    out = {}
    for name, texts in sets.items():
        dec = route_all(router, model, tok, texts)
        wrong = [(t, x.domain) for t, x in zip(texts, dec) if x.domain != BASE]
        out[name] = {"n": len(texts), "to_base_pct": 100 * (len(texts) - len(wrong)) / len(texts),
                     "reasons": {r: sum(x.reason == r for x in dec) for r in {x.reason for x in dec}},
                     "not_to_base": wrong[:40]}
    out["mean_over_sources_pct"] = sum(v["to_base_pct"] for v in out.values()) / len(out)
    return out


def latency(router, model, tok, texts: list[str]) -> dict:
    for t in texts[:3]:
        route_texts(router, model, tok, [t])
    wall, cpu = [], []
    for t in texts:
        s, c = time.perf_counter(), time.thread_time()
        route_texts(router, model, tok, [t])
        wall.append(1000 * (time.perf_counter() - s))
        cpu.append(1000 * (time.thread_time() - c))
    q = lambda v, p: float(torch.quantile(torch.tensor(v, dtype=torch.float64), p))   # noqa: E731
    return {"n": len(texts), "threads": torch.get_num_threads(),
            "wall_p50_ms": q(wall, .5), "wall_p95_ms": q(wall, .95),
            "cpu_p50_ms": q(cpu, .5), "cpu_p95_ms": q(cpu, .95),
            "loadavg_1min": os.getloadavg()[0]}


def disjointness(corpus: Path, cfg: RouterConfig, calib: str) -> dict:
    """Calibration passages vs evaluation queries, by doc_id, per domain (must all be 0)."""
    from crma.routing import calibration_split

    out = {}
    for d in DOMAINS:
        train = records(corpus / d / "train.jsonl")
        q_docs = {r["doc_id"] for r in records(corpus / d / "queries.jsonl")}
        if calib == "pool":
            cal = records(corpus / d / "pool.jsonl")[: cfg.max_calib]
        else:
            _, held = calibration_split([r["text"] for r in train], cfg.calib_fraction, cfg.max_calib)
            held = set(held)
            cal = [r for r in train if r["text"] in held]
        out[d] = {"calibration_passages": len(cal),
                  "shared_doc_ids_with_queries": len({r["doc_id"] for r in cal} & q_docs)}
    return out


def build(variant: str, corpus: Path, model, tok, max_passages: int, max_calib: int, calib: str) -> tuple:
    cfg = RouterConfig(**{**VARIANTS[variant], "max_passages": max_passages, "max_calib": max_calib})
    t0 = time.perf_counter()
    router = new_router(model, cfg, meta={"model": "smollm2-135m"}, tokenizer=tok)
    for d in DOMAINS:
        train = read_texts(corpus / d / "train.jsonl")
        extra = read_texts(corpus / d / "pool.jsonl")[:max_calib] if calib == "pool" else None
        update_router(router, model, tok, d, d, train, calib_texts=extra)
        print(f"  {variant}: {d} added ({router.calibration[d]['n_train']} segments, "
              f"{router.calibration[d]['n_calib']} calibration segments, "
              f"{router.calibration[d]['build_seconds']:.0f} s)",
              flush=True)
    return cfg, router, time.perf_counter() - t0


def demo(variant: str, model, tok, cfg: RouterConfig) -> dict:
    router = new_router(model, cfg, tokenizer=tok)
    names = ("cooking", "astronomy", "contracts")
    for d in names:
        update_router(router, model, tok, d, d, read_texts(DEMO / d / "train.jsonl"))
    q = accuracy(router, model, tok, {d: read_texts(DEMO / d / "queries.jsonl") for d in names})
    four = route_all(router, model, tok, list(FOUR))
    return {"queries": q, "four_questions": {t: {"expected": e, "routed": x.domain, "reason": x.reason,
                                                  "confidence": round(x.confidence, 3)}
                                              for (t, e), x in zip(FOUR.items(), four)},
            "four_correct": sum(x.domain == e for e, x in zip(FOUR.values(), four))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=ROOT / "benchmarks" / "corpora" / "cl5")
    ap.add_argument("--variants", default="minilm")
    ap.add_argument("--max-passages", type=int, default=RouterConfig().max_passages)
    ap.add_argument("--max-calib", type=int, default=RouterConfig().max_calib)
    ap.add_argument("--calib", choices=("train", "pool"), default="train",
                    help="held-back slice of train (default, what a store does) or pool.jsonl")
    ap.add_argument("--n-random", type=int, default=200)
    ap.add_argument("--latency-queries", type=int, default=100)
    ap.add_argument("--no-heldout", action="store_true", help="skip the held-back sets")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here (JSON)")
    ap.add_argument("--save-routers", type=Path, default=None, help="save each variant's router in DIR/<variant>")
    ap.add_argument("--cold-start-only", action="store_true",
                    help="only measure MiniLM's cold start and add it to --out (an existing results file)")
    args = ap.parse_args()
    if args.cold_start_only:
        results = json.loads(args.out.read_text(encoding="utf-8")) if args.out and args.out.exists() else {}
        results["minilm_cold_start"] = cold_start()
        print(results["minilm_cold_start"])
        if args.out:
            args.out.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")
        return
    torch.set_num_threads(1)
    from crma.method.models import load_model

    results = {"command": " ".join(["python"] + sys.argv), "corpus": str(args.corpus), "calibration": args.calib,
               "machine": {"cpus": os.cpu_count(), "torch_threads": 1}, "variants": {}}
    if any(VARIANTS[v].get("encoder", "minilm") == "minilm" for v in args.variants.split(",")):
        results["minilm_cold_start"] = cold_start()
    need_base = any(VARIANTS[v].get("encoder") == "base" for v in args.variants.split(","))
    t0, m0 = time.perf_counter(), rss_mb()
    model, tok = load_model("smollm2-135m") if need_base else load_model("tiny:llama")
    results["base_model_load"] = {"seconds": time.perf_counter() - t0, "rss_mb_added": rss_mb() - m0,
                                  "model": "smollm2-135m" if need_base else "tiny:llama (placeholder: MiniLM "
                                  "routers do not read the base model)"}
    queries = {d: read_texts(args.corpus / d / "queries.jsonl") for d in DOMAINS}
    qsets = {split: {d: read_queries(SETS / f"questions_{split}" / f"{d}.txt") for d in DOMAINS}
             for split in ("dev", "heldout", "heldout2")}
    ood = {"dev": {"random_strings": eval_random_strings(args.n_random, 0),
                   "non_english": read_queries(SETS / "non_english_dev.txt"),
                   "everyday_english": read_queries(SETS / "everyday_dev.txt")},
           "heldout": {"random_strings": eval_random_strings(args.n_random, 1),
                       "non_english": read_queries(SETS / "non_english_heldout.txt"),
                       "everyday_english": read_queries(SETS / "everyday_heldout.txt")},
           "heldout2": {"random_strings": eval_random_strings(args.n_random, 2),
                        "non_english": read_queries(SETS / "non_english_heldout2.txt"),
                        "everyday_english": read_queries(SETS / "everyday_heldout2.txt")}}
    splits = ("dev",) if args.no_heldout else ("dev", "heldout", "heldout2")
    lat_texts = [q for d in DOMAINS for q in queries[d][: args.latency_queries // (2 * len(DOMAINS))]]
    lat_texts += ood["dev"]["everyday_english"][: args.latency_queries - len(lat_texts)]
    for variant in args.variants.split(","):
        print(f"== {variant}", flush=True)
        mem0 = rss_mb()
        if VARIANTS[variant].get("encoder", "minilm") == "minilm":
            from crma.routing.encoders import minilm
            enc = minilm()
            encoder = {"name": "all-MiniLM-L6-v2", "parameters": enc.n_params, "load_seconds": enc.load_seconds,
                       "rss_mb_added": rss_mb() - mem0, "weights_mb_fp32": enc.n_params * 4 / 2**20}
        else:
            encoder = {"name": "smollm2-135m blocks 1-6", "load_seconds": results["base_model_load"]["seconds"],
                       "rss_mb_added": results["base_model_load"]["rss_mb_added"]}
        cfg, router, seconds = build(variant, args.corpus, model, tok, args.max_passages, args.max_calib, args.calib)
        if args.save_routers:
            (args.save_routers / variant).mkdir(parents=True, exist_ok=True)
            router.save_to(args.save_routers / variant)
        r = {"config": vars(cfg), "build_seconds": seconds, "encoder": encoder, "summary": router.summary(),
             "calibration": router.calibration, "disjoint": disjointness(args.corpus, cfg, args.calib)}
        r["cl5_queries"] = accuracy(router, model, tok, queries)
        print(f"  cl5 queries accuracy {r['cl5_queries']['accuracy_pct']:.1f}%", flush=True)
        for split in splits:
            r[f"questions_{split}"] = accuracy(router, model, tok, qsets[split])
            r[f"to_base_{split}"] = to_base(router, model, tok, ood[split])
            print(f"  {split}: plain questions {r[f'questions_{split}']['accuracy_pct']:.1f}%  to base: "
                  + "  ".join(f"{k} {v['to_base_pct']:.1f}%" for k, v in r[f"to_base_{split}"].items()
                              if k != "mean_over_sources_pct")
                  + f"  mean {r[f'to_base_{split}']['mean_over_sources_pct']:.1f}%", flush=True)
        r["latency"] = latency(router, model, tok, lat_texts)
        print(f"  latency (1 thread): p50 {r['latency']['wall_p50_ms']:.1f} ms wall, "
              f"{r['latency']['cpu_p50_ms']:.1f} ms CPU; p95 {r['latency']['wall_p95_ms']:.1f} ms wall "
              f"(load average {r['latency']['loadavg_1min']:.1f})", flush=True)
        r["demo"] = demo(variant, model, tok, cfg)
        print(f"  demo: queries {r['demo']['queries']['accuracy_pct']:.1f}%, four questions "
              f"{r['demo']['four_correct']}/4 "
              f"{[v['routed'] for v in r['demo']['four_questions'].values()]}", flush=True)
        results["variants"][variant] = r
        results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
