"""Measure the router on the cl5 corpus without training any adapter (prints figures, times things).

Builds routers straight from the base model's features of each domain's train passages (calibrated on
its holdout passages), then routes every domain's queries.jsonl and out-of-domain inputs, for each
layer and strategy asked for; also leave-two-out routers (3 domains) so the untrained cl5 domains
serve as out-of-domain text, and single-query latency per layer.

    .venv/bin/python benchmarks/route_measure.py --corpus ../shared/corpora/cl5 --layers 4,6,8
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from crma.data import read_passages
from crma.routing.features import domain_features, hidden_features
from crma.method.models import load_model
from crma.routing.route_eval import TARGETS, ood_sets
from crma.routing.router import BASE, STRATEGIES, Router, RouterConfig

DOMAINS = ("medical", "legal", "finance", "code", "science")
SPLITS = (("medical", "legal", "finance"), ("code", "science", "legal"))     # leave-two-out routers


def evaluate(router: Router, queries: dict, ood: dict) -> dict:
    """Accuracy (abstaining = wrong), classification accuracy (best guess), OOD share sent to base."""
    acc = cls = n = 0
    for d in router.names:
        decisions = router.route_batch(queries[d])
        acc += sum(x.domain == d for x in decisions)
        cls += sum(x.best == d for x in decisions)
        n += len(decisions)
    to_base = {k: sum(x.domain == BASE for x in router.route_batch(v)) / len(v.pooled) for k, v in ood.items()}
    pooled = sum(to_base[k] * len(ood[k].pooled) for k in ood) / sum(len(v.pooled) for v in ood.values())
    return {"acc": 100 * acc / n, "cls": 100 * cls / n, "ood_macro": 100 * sum(to_base.values()) / len(to_base),
            "ood_pooled": 100 * pooled, "per_source": {k: 100 * v for k, v in to_base.items()}}


def latency(model, tok, texts: list[str], cfg: RouterConfig, router: Router) -> tuple[float, float]:
    """p50 / p95 ms of routing one query at a time (tokenise + features + decision)."""
    for t in texts[:3]:
        router.route(hidden_features(model, tok, [t], cfg.layer, cfg.max_tokens, 1))
    ms = []
    for t in texts:
        start = time.perf_counter()
        router.route(hidden_features(model, tok, [t], cfg.layer, cfg.max_tokens, 1))
        ms.append(1000 * (time.perf_counter() - start))
    ms.sort()
    return statistics.median(ms), ms[int(0.95 * (len(ms) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="4,6,8")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--train-passages", type=int, default=100)
    ap.add_argument("--calib-passages", type=int, default=60)
    ap.add_argument("--latency-queries", type=int, default=60)
    ap.add_argument("--threads", default="2", help="comma list of torch thread counts for the latency runs")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    corpus = args.corpus
    ood_texts = ood_sets(corpus, list(DOMAINS), seed=0, n_random=50)
    cooking = Path(__file__).resolve().parents[1] / "crma" / "demo_data" / "cooking" / "queries.jsonl"
    if cooking.exists():
        ood_texts["demo_cooking_queries"] = read_passages(cooking)
    queries_text = {d: read_passages(corpus / d / "queries.jsonl") for d in DOMAINS}
    lat_texts = [q for d in DOMAINS for q in queries_text[d][: max(1, args.latency_queries // len(DOMAINS))]]
    print(f"model {args.model}; {args.train_passages} train / {args.calib_passages} holdout passages per domain; "
          f"OOD sources {[(k, len(v)) for k, v in ood_texts.items()]}; targets {TARGETS}")
    for layer in [int(x) for x in args.layers.split(",")]:
        base_cfg = RouterConfig(layer=layer)
        start = time.perf_counter()
        train = {d: domain_features(model, tok, read_passages(corpus / d / "train.jsonl"), base_cfg,
                                    args.train_passages) for d in DOMAINS}
        calib = {d: domain_features(model, tok, read_passages(corpus / d / "holdout.jsonl"), base_cfg,
                                    args.calib_passages) for d in DOMAINS}
        queries = {d: hidden_features(model, tok, queries_text[d], layer, base_cfg.max_tokens) for d in DOMAINS}
        ood = {k: hidden_features(model, tok, v, layer, base_cfg.max_tokens) for k, v in ood_texts.items()}
        print(f"\nlayer {layer}: features in {time.perf_counter() - start:.0f}s "
              f"({sum(len(f.pooled) for f in train.values())} train segments)")
        for strategy in args.strategies.split(","):
            cfg = RouterConfig(layer=layer, strategy=strategy)
            router = Router(cfg)
            started = time.perf_counter()
            for d in DOMAINS:
                router.add_domain(d, train[d], calib[d])
            build_ms = 1000 * (time.perf_counter() - started)
            r = evaluate(router, queries, ood)
            print(f"  {strategy:<9} 5 domains: accuracy {r['acc']:6.2f}%  (best guess {r['cls']:6.2f}%)  "
                  f"OOD to base: pooled {r['ood_pooled']:5.1f}%  macro {r['ood_macro']:5.1f}%  "
                  + "  ".join(f"{k}={v:.0f}%" for k, v in r["per_source"].items()) + f"  [build {build_ms:.0f} ms]")
            for split in SPLITS:
                sub = Router(cfg)
                for d in split:
                    sub.add_domain(d, train[d], calib[d])
                rest = {f"untrained:{d}": queries[d] for d in DOMAINS if d not in split}
                s = evaluate(sub, queries, rest)
                print(f"  {'':<9} {'+'.join(split)}: accuracy {s['acc']:6.2f}%  untrained to base: "
                      + "  ".join(f"{k.split(':')[1]}={v:.0f}%" for k, v in s["per_source"].items()))
        router = Router(base_cfg)
        for d in DOMAINS:
            router.add_domain(d, train[d], calib[d])
        threads = torch.get_num_threads()
        for n in [int(x) for x in args.threads.split(",")]:
            torch.set_num_threads(n)
            p50, p95 = latency(model, tok, lat_texts, base_cfg, router)
            print(f"  latency, {n} thread(s): p50 {p50:.1f} ms  p95 {p95:.1f} ms  ({len(lat_texts)} queries)")
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
