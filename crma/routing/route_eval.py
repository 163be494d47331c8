"""`crma route-eval`: how well the router of a finished run routes, and what its mistakes cost.

Reports accuracy per domain and overall on each trained domain's queries.jsonl (abstaining counts as
wrong), the confusion matrix, the share of out-of-domain inputs sent to `base`, p50/p95 latency of
routing one query (tokenise + base-model features + decision), and with --loss the holdout loss with
routed adapters versus oracle adapters. Prints the issue's targets with pass/fail and the gap, and
writes DIR/route_eval.json (atomically) with the resolved settings.
"""
from __future__ import annotations

import random
import string
import time
from pathlib import Path

import torch

from ..data import read_passages, tokenize
from ..evaluate import mean_loss, passage_losses
from ..inference import LoadedRun, load_run
from ..io import write_json
from .router import BASE, quantile_summary

TARGETS = {"accuracy_pct": 98.0, "ood_to_base_pct": 90.0, "latency_p50_ms": 25.0, "routed_loss_gap_pct": 1.0}

# Out-of-domain text written for this check (everyday topics, none of them a cl5 domain).
NON_ENGLISH = {
    "de": "Am Wochenende sind wir mit den Kindern an den See gefahren. Das Wetter war herrlich, und nach "
          "dem Schwimmen haben wir am Ufer ein Picknick gemacht. Auf dem Rückweg gab es noch ein Eis im "
          "Dorf, und alle waren müde, aber glücklich, als wir am Abend wieder zu Hause ankamen.",
    "es": "Mi abuela siempre prepara una tortilla de patatas los domingos. Corta las patatas muy finas, "
          "las fríe despacio con mucho aceite y después las mezcla con los huevos batidos. Toda la familia "
          "se sienta alrededor de la mesa y hablamos durante horas mientras tomamos café.",
    "fr": "Ce matin, le marché du village était plein de monde. Les marchands vendaient des fromages, du "
          "pain encore chaud et des fraises qui sentaient bon l'été. Nous avons acheté des fleurs pour la "
          "maison, puis nous avons pris un café sur la place en regardant passer les vélos.",
    "it": "Ogni estate andiamo in montagna con gli amici. Partiamo presto la mattina, camminiamo per ore "
          "nei boschi e ci fermiamo a mangiare in un piccolo rifugio. La sera giochiamo a carte e "
          "guardiamo le stelle, che lassù sembrano molto più vicine.",
    "nl": "Gisteren heb ik de hele middag in de tuin gewerkt. Ik heb het gras gemaaid, de heg gesnoeid en "
          "nieuwe tulpenbollen geplant. Daarna zat ik met een kop thee op het terras en luisterde naar de vogels.",
}
DOMAIN_FREE = {   # English, each topic skipped when a trained domain has its name
    "cooking": ["Brown the onions slowly in butter before adding the stock, and let the soup simmer for "
                "twenty minutes.", "Whisk the egg whites until stiff peaks form, then fold them gently "
                "into the chocolate so the mousse stays light.",
                "How long should a roast chicken rest before I carve it?"],
    "gardening": ["Tomatoes need full sun and deep watering twice a week once the first flowers appear.",
                  "Prune the roses in late winter, cutting just above an outward-facing bud.",
                  "What is the best way to keep slugs away from young lettuce plants?"],
    "sports": ["The home team scored twice in the last ten minutes and won the match three goals to one.",
               "She finished the marathon in under four hours after months of early morning training runs.",
               "Who holds the record for the most home runs in a single baseball season?"],
    "travel": ["We took the night train to the coast and spent the morning walking along the harbour.",
               "The hostel was small but clean, and the owner gave us a map of the best cafes in town.",
               "Is it cheaper to fly or to take the ferry to the islands in early spring?"],
    "music": ["The band opened with a slow acoustic version of their first hit before the drums came in.",
              "Practise the scale slowly with a metronome and speed up only when every note is even."],
    "home": ["Turn off the water supply under the sink before you replace the washer in a dripping tap.",
             "Sand the old paint lightly and wipe off the dust before you put on the first coat."],
}


def random_strings(n: int, seed: int) -> list[str]:
    """`n` seeded random strings of printable ASCII, 10-200 characters each."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "      "
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(10, 200))).strip() or "x" for _ in range(n)]


def ood_sets(corpus: Path, trained: list[str], seed: int, n_random: int) -> dict[str, list[str]]:
    """Out-of-domain inputs: queries of corpus domains the run did not train, random character strings,
    non-English paragraphs (each whole and sentence by sentence) and English domain-free sentences."""
    sets = {}
    for folder in sorted(p for p in corpus.iterdir() if p.is_dir()):
        if folder.name not in trained and (folder / "queries.jsonl").exists():
            sets[f"untrained:{folder.name}"] = read_passages(folder / "queries.jsonl")
    sets["random_strings"] = random_strings(n_random, seed)
    sets["non_english"] = [p for text in NON_ENGLISH.values()
                           for p in [text] + [s.strip() + "." for s in text.split(". ") if len(s.split()) >= 5]]
    sets["domain_free_english"] = [t for topic, texts in DOMAIN_FREE.items() if topic not in trained for t in texts]
    return {k: v for k, v in sets.items() if v}


def timed_route(run: LoadedRun, texts: list[str]) -> tuple[list, list[float]]:
    """Route texts one at a time, as a server would: decisions and per-query latency in ms."""
    decisions, ms = [], []
    for text in texts:
        start = time.perf_counter()
        decisions.append(run.router.route(run.features([text], batch_size=1)))
        ms.append(1000 * (time.perf_counter() - start))
    return decisions, ms


def routing_report(run: LoadedRun, corpus: Path, max_queries: int, seed: int, n_random: int) -> dict:
    names = run.router.names
    timed_route(run, ["warm-up query one", "warm-up query two"])                 # not counted
    per_domain, confusion, latencies = {}, {d: {c: 0 for c in names + [BASE]} for d in names}, []
    for d in names:
        queries = read_passages(corpus / d / "queries.jsonl")
        queries = queries[:max_queries] if max_queries else queries
        decisions, ms = timed_route(run, queries)
        latencies += ms
        for dec in decisions:
            confusion[d][dec.domain] += 1
        correct = confusion[d][d]
        per_domain[d] = {"n": len(queries), "correct": correct, "accuracy_pct": 100 * correct / len(queries),
                         "abstained": confusion[d][BASE]}
    n = sum(v["n"] for v in per_domain.values())
    ood = {}
    for source, texts in ood_sets(corpus, names, seed, n_random).items():
        decisions, ms = timed_route(run, texts)
        latencies += ms
        to_base = sum(dec.domain == BASE for dec in decisions)
        routed = {}
        for dec in decisions:
            if dec.domain != BASE:
                routed[dec.domain] = routed.get(dec.domain, 0) + 1
        ood[source] = {"n": len(texts), "to_base": to_base, "to_base_pct": 100 * to_base / len(texts),
                       "routed_to": routed}
    n_ood = sum(v["n"] for v in ood.values())
    return {"per_domain": per_domain, "confusion": confusion,
            "accuracy_pct": 100 * sum(v["correct"] for v in per_domain.values()) / n, "n_queries": n,
            "in_domain_abstained_pct": 100 * sum(v["abstained"] for v in per_domain.values()) / n,
            "ood": ood, "n_ood": n_ood,
            "ood_to_base_pct": 100 * sum(v["to_base"] for v in ood.values()) / max(1, n_ood),
            "ood_to_base_macro_pct": sum(v["to_base_pct"] for v in ood.values()) / max(1, len(ood)),
            "latency_ms": quantile_summary(latencies), "torch_threads": torch.get_num_threads()}


def loss_report(run: LoadedRun, corpus: Path, max_holdout: int) -> dict:
    """Holdout loss per domain with each passage's routed adapter vs its domain's own (oracle) adapter.

        gap_pct = 100 * (L_routed - L_oracle) / L_oracle      (token-weighted mean losses)
    """
    train = run.info.get("train", {})
    max_len, ebs = int(train.get("max_len", 256)), int(train.get("eval_batch_size", 8))
    pad_id = run.tokenizer.pad_token_id
    per_domain, all_routed, all_oracle = {}, [], []
    for d in run.router.names:
        texts = read_passages(corpus / d / "holdout.jsonl")
        texts = texts[:max_holdout] if max_holdout else texts
        keep = [t for t in texts if tokenize([t], run.tokenizer, max_len)]     # passages of >= 2 tokens
        ids = tokenize(keep, run.tokenizer, max_len)
        decisions = run.route(keep)
        with run.using(d):
            oracle = passage_losses(run.model, ids, ebs, pad_id, progress=False)
        routed = list(oracle)
        wrong = {}
        for i, dec in enumerate(decisions):
            if run.adapter_for(dec.domain) != run.adapter_for(d):
                wrong.setdefault(dec.domain, []).append(i)
        for dom, idx in wrong.items():                    # only misrouted passages change their loss
            with run.using(dom):
                for i, loss in zip(idx, passage_losses(run.model, [ids[i] for i in idx], ebs, pad_id,
                                                       progress=False)):
                    routed[i] = loss
        lo, lr = mean_loss(oracle), mean_loss(routed)
        per_domain[d] = {"n": len(ids), "misrouted": sum(len(v) for v in wrong.values()),
                         "oracle_loss": lo, "routed_loss": lr, "gap_pct": 100 * (lr - lo) / lo}
        all_routed += routed
        all_oracle += oracle
    lo, lr = mean_loss(all_oracle), mean_loss(all_routed)
    return {"per_domain": per_domain, "oracle_loss": lo, "routed_loss": lr, "gap_pct": 100 * (lr - lo) / lo,
            "max_len": max_len}


def check_targets(report: dict) -> list[dict]:
    """Each target with its measured value, pass/fail and the gap when it fails (never lowered).

    The out-of-domain target is checked on the mean over OOD sources (each source weighs the same),
    which is stricter than the pooled share when easy sources (random strings) are the most numerous."""
    rows = [("accuracy_pct", report["routing"]["accuracy_pct"], ">="),
            ("ood_to_base_pct", report["routing"]["ood_to_base_macro_pct"], ">="),
            ("latency_p50_ms", report["routing"]["latency_ms"]["p50"], "<=")]
    if report.get("loss"):
        rows.append(("routed_loss_gap_pct", report["loss"]["gap_pct"], "<="))
    out = []
    for name, value, op in rows:
        target = TARGETS[name]
        ok = value >= target if op == ">=" else value <= target
        out.append({"name": name, "target": f"{op} {target:g}", "value": value, "pass": bool(ok),
                    "short_by": 0.0 if ok else abs(value - target)})
    return out


def route_eval(run_dir: str | Path, corpus: str | Path, loss: bool = False, max_queries: int = 0,
               max_holdout: int = 100, seed: int = 0, n_random: int = 50, command: str = "") -> dict:
    """Load the run, evaluate, write DIR/route_eval.json; returns the report."""
    run_dir, corpus = Path(run_dir), Path(corpus)
    if not corpus.is_dir():
        raise FileNotFoundError(f"{corpus}: no such corpus folder")
    run = load_run(run_dir, adapters=loss)
    report = {"run": str(run_dir), "corpus": str(corpus), "model": run.info["model"],
              "condition": run.info["condition"], "domains": run.router.names, "adapters": run.router.adapters,
              "router": {"config": vars(run.router.cfg), "meta": run.router.meta},
              "settings": {"loss": loss, "max_queries": max_queries, "max_holdout": max_holdout, "seed": seed,
                           "n_random": n_random},
              "command": command, "targets_spec": TARGETS}
    report["routing"] = routing_report(run, corpus, max_queries, seed, n_random)
    if loss:
        report["loss"] = loss_report(run, corpus, max_holdout)
    report["targets"] = check_targets(report)
    write_json(run_dir / "route_eval.json", report)
    return report


def format_report(report: dict) -> str:
    r = report["routing"]
    names = report["domains"]
    w = max(8, *(len(n) for n in names + [BASE])) + 2
    lines = [f"crma route-eval: {report['run']}  model={report['model']}  condition={report['condition']}  "
             f"router={report['router']['config']['strategy']} layer={report['router']['meta'].get('layer')}",
             "accuracy per domain (queries.jsonl; abstaining counts as wrong):"]
    for d, v in r["per_domain"].items():
        lines.append(f"  {d:<{w}} {v['accuracy_pct']:6.2f}%  ({v['correct']}/{v['n']}, {v['abstained']} to base)")
    lines.append(f"  {'overall':<{w}} {r['accuracy_pct']:6.2f}%  ({r['n_queries']} queries, "
                 f"{r['in_domain_abstained_pct']:.2f}% abstained)")
    lines.append("confusion (rows: true domain, columns: routed to):")
    lines.append(" " * (w + 2) + "".join(c.rjust(w) for c in names + [BASE]))
    for d in names:
        lines.append(f"  {d:<{w}}" + "".join(str(r["confusion"][d][c]).rjust(w) for c in names + [BASE]))
    lines.append("out-of-domain inputs routed to base:")
    for src, v in r["ood"].items():
        extra = f"  others to {v['routed_to']}" if v["routed_to"] else ""
        lines.append(f"  {src:<24} {v['to_base_pct']:6.2f}%  ({v['to_base']}/{v['n']}){extra}")
    lines.append(f"  {'all (pooled)':<24} {r['ood_to_base_pct']:6.2f}%  ({r['n_ood']} inputs)")
    lines.append(f"  {'mean over sources':<24} {r['ood_to_base_macro_pct']:6.2f}%  (the target's measure)")
    lat = r["latency_ms"]
    lines.append(f"routing latency per query: p50 {lat['p50']:.2f} ms, p95 {lat['p95']:.2f} ms "
                 f"({lat['n']} queries, one at a time, {r['torch_threads']} torch threads)")
    if report.get("loss"):
        lines.append("holdout loss, routed vs oracle adapters:")
        for d, v in report["loss"]["per_domain"].items():
            lines.append(f"  {d:<{w}} oracle {v['oracle_loss']:.4f}  routed {v['routed_loss']:.4f}  "
                         f"gap {v['gap_pct']:+.3f}%  ({v['misrouted']}/{v['n']} misrouted)")
        lines.append(f"  {'overall':<{w}} oracle {report['loss']['oracle_loss']:.4f}  routed "
                     f"{report['loss']['routed_loss']:.4f}  gap {report['loss']['gap_pct']:+.3f}%")
    lines.append("targets:")
    for t in report["targets"]:
        status = "PASS" if t["pass"] else f"FAIL (short by {t['short_by']:.2f})"
        lines.append(f"  {t['name']:<22} {t['target']:<8} measured {t['value']:.2f}  {status}")
    return "\n".join(lines)
