"""`crma route-eval`: how well a router routes, and what its mistakes cost.

Labelled sets: each router domain's queries.jsonl under --corpus, and any --queries NAME=FILE. Reports
accuracy per set and overall (abstaining counts as wrong), the confusion matrix, the share of each
out-of-domain source sent to `base` (corpus domains the router lacks, random strings, built-in non-English
and domain-free English sentences, and any --ood FILE) and their mean over sources, p50/p95 latency of
routing one query at a time (encoder + decision), and with --loss the holdout loss with routed adapters
versus oracle adapters. Prints the targets with pass/fail and the gap.
"""
from __future__ import annotations

import random
import string
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import DeviceConfig, TrainConfig
from ..data import DataError, examples_for, read_queries
from ..routing import BASE, Router, RouterError, route_texts
from ..routing.stats import quantile_summary
from ..runtime import load_placed
from ..store import Store
from .evaluation import holdout_records
from .live import LiveModel
from .loss import mean_loss, passage_losses


@dataclass
class Source:
    """A router with what computes its features: a store's (its base model, opened as the store's LiveModel),
    or a router folder's (with the base model only when its encoder reads it)."""
    router: Router
    model: object | None          # base model (None: not needed by the router's encoder)
    tokenizer: object | None
    label: str                    # for reports
    live: LiveModel | None = None  # the store's model (None for a router folder)
    kind: str = "store"           # store | router


def open_source(store: Path | None = None, router: Path | None = None, model: str | None = None,
                device: DeviceConfig | None = None) -> Source:
    """The router of a store (its current version, on the store's model: opening it checks the store is whole
    and on the model it names), or of a router folder (+ `model`, the base model spec, when its encoder needs it)."""
    if (store is None) == (router is None):
        raise RouterError("give exactly one of --store DIR or --router FOLDER (with --model SPEC)")
    if router is not None:
        rt = Router.load(router)
        spec = model or rt.meta.get("model")
        if rt.cfg.encoder != "base":
            return Source(rt, None, None, str(router), kind="router")
        if not spec:
            raise RouterError("--router: give --model SPEC (the base model the router was built for)")
        base, tok = load_placed(spec, device, seed=0)
        return Source(rt, base, tok, str(router), kind="router")
    opened = Store(store)
    rt = opened.router()
    if rt is None or not rt.names:
        raise RouterError(f"{store}: the store has no router yet (no domain added)")
    live = LiveModel.open(opened, device=device)
    return Source(rt, live.model, live.tokenizer, str(store), live)


TARGETS = {"accuracy_pct": 99.0, "ood_to_base_pct": 95.0, "latency_p50_ms": 25.0, "routed_loss_gap_pct": 1.0}

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


def ood_sets(corpus: Path | None, trained: list[str], seed: int, n_random: int,
             builtin: bool = True) -> dict[str, list[str]]:
    """Out-of-domain inputs: queries of corpus domains the router lacks, random character strings, and
    (builtin) non-English paragraphs (each whole and sentence by sentence) and English domain-free sentences."""
    sets = {}
    if corpus is not None:
        for folder in sorted(p for p in corpus.iterdir() if p.is_dir()):
            if folder.name not in trained and (folder / "queries.jsonl").exists():
                sets[f"untrained:{folder.name}"] = read_queries(folder / "queries.jsonl")
    if n_random:
        sets["random_strings"] = random_strings(n_random, seed)
    if builtin:
        sets["non_english"] = [p for text in NON_ENGLISH.values()
                               for p in [text] + [s.strip() + "." for s in text.split(". ") if len(s.split()) >= 5]]
        sets["domain_free_english"] = [t for topic, texts in DOMAIN_FREE.items() if topic not in trained
                                       for t in texts]
    return {k: v for k, v in sets.items() if v}


def timed_route(src, texts: list[str]) -> tuple[list, list[float], list[float]]:
    """Route texts one at a time, as a server would: decisions, per-query wall ms and CPU ms (this
    thread's CPU time: what the query itself cost, whatever else the machine runs)."""
    decisions, wall, cpu = [], [], []
    for text in texts:
        start, start_cpu = time.perf_counter(), time.thread_time()
        decisions.append(route_texts(src.router, src.model, src.tokenizer, [text])[0])
        wall.append(1000 * (time.perf_counter() - start))
        cpu.append(1000 * (time.thread_time() - start_cpu))
    return decisions, wall, cpu


def labelled_sets(names: list[str], corpus: Path | None, queries: list[tuple[str, Path]],
                  max_queries: int) -> tuple[dict, dict]:
    """({set name: (domain, texts)} labelled with a router domain, {name: texts} that should go to base)."""
    sets, to_base = {}, {}
    if corpus is not None:
        for d in names:
            path = corpus / d / "queries.jsonl"
            if path.exists():
                sets[d] = (d, read_queries(path))
    for name, path in queries:
        texts = read_queries(path)
        if name == BASE:
            to_base[f"base:{path.stem}"] = texts
            continue
        if name not in names:
            raise DataError(f"--queries {name}={path}: {name!r} is not a domain of this router ({', '.join(names)})")
        key = name if name not in sets else f"{name}:{path.stem}"
        sets[key] = (name, texts)
    if max_queries:
        sets = {k: (d, t[:max_queries]) for k, (d, t) in sets.items()}
    return sets, to_base


def routing_report(src, corpus: Path | None, queries: list[tuple[str, Path]], ood: list[Path],
                   max_queries: int, seed: int, n_random: int, builtin_ood: bool = True) -> dict:
    names = src.router.names
    timed_route(src, ["warm-up query one", "warm-up query two"])                 # not counted
    sets, extra_ood = labelled_sets(names, corpus, queries, max_queries)
    per_set, confusion = {}, {d: {c: 0 for c in names + [BASE]} for d in names}
    wall, cpu, reasons = [], [], {}
    for key, (d, texts) in sets.items():
        decisions, ms, cms = timed_route(src, texts)
        wall += ms
        cpu += cms
        counts = {c: 0 for c in names + [BASE]}
        for dec in decisions:
            counts[dec.domain] += 1
            confusion[d][dec.domain] += 1
            if dec.domain == BASE:
                reasons[dec.reason] = reasons.get(dec.reason, 0) + 1
        per_set[key] = {"domain": d, "n": len(texts), "correct": counts[d],
                        "accuracy_pct": 100 * counts[d] / len(texts),
                        "abstained": counts[BASE]}
    n = sum(v["n"] for v in per_set.values())
    ood_inputs = ood_sets(corpus, names, seed, n_random, builtin_ood)
    ood_inputs.update(extra_ood)
    for path in ood:
        ood_inputs[f"ood:{Path(path).stem}"] = read_queries(path)
    report_ood = {}
    for source, texts in ood_inputs.items():
        decisions, ms, cms = timed_route(src, texts)
        wall += ms
        cpu += cms
        to_base = sum(dec.domain == BASE for dec in decisions)
        routed, why = {}, {}
        for dec in decisions:
            if dec.domain != BASE:
                routed[dec.domain] = routed.get(dec.domain, 0) + 1
            else:
                why[dec.reason] = why.get(dec.reason, 0) + 1
        report_ood[source] = {"n": len(texts), "to_base": to_base, "to_base_pct": 100 * to_base / len(texts),
                              "routed_to": routed, "reasons": why}
    n_ood = sum(v["n"] for v in report_ood.values())
    return {"per_domain": per_set, "confusion": confusion,
            "accuracy_pct": 100 * sum(v["correct"] for v in per_set.values()) / n if n else float("nan"),
            "n_queries": n,
            "in_domain_abstained_pct": 100 * sum(v["abstained"] for v in per_set.values()) / n if n else 0.0,
            "in_domain_abstain_reasons": reasons,
            "ood": report_ood, "n_ood": n_ood,
            "ood_to_base_pct": 100 * sum(v["to_base"] for v in report_ood.values()) / max(1, n_ood),
            "ood_to_base_macro_pct": (sum(v["to_base_pct"] for v in report_ood.values()) / len(report_ood)
                                      if report_ood else float("nan")),
            "latency_ms": quantile_summary(wall), "latency_cpu_ms": quantile_summary(cpu),
            "torch_threads": torch.get_num_threads()}


def loss_report(live: LiveModel, router: Router, corpus: Path, max_holdout: int) -> dict:
    """Holdout loss per domain with each passage's routed adapter vs its domain's own (oracle) adapter, each
    on its pinned backbone version (how the store serves):

        gap_pct = 100 * (L_routed - L_oracle) / L_oracle      (token-weighted mean losses)
    """
    store = live.store
    tok = live.tokenizer
    pad_id = tok.pad_token_id

    def adapter_for(domain: str) -> str | None:
        return None if domain == BASE else store.adapter_name(domain)

    per_domain, all_routed, all_oracle = {}, [], []
    for d in router.names:
        meta = store.adapter_meta(d)
        cfg = TrainConfig.recorded(meta["train"])             # the holdout read as the adapter's was
        records = holdout_records(corpus / d / "holdout.jsonl", d, replace(cfg, max_holdout=max_holdout), meta)
        ids, origin, _ = examples_for(records, tok, cfg)
        routed_records = route_texts(router, live.model, tok, [r.query() for r in records])
        decisions = [routed_records[i] for i in origin]        # every example of a record goes where it goes
        with live.using(d) as model:
            oracle = passage_losses(model, ids, cfg.eval_batch_size, pad_id, progress=False)
        routed = list(oracle)
        wrong = {}
        for i, dec in enumerate(decisions):
            if adapter_for(dec.domain) != adapter_for(d):
                wrong.setdefault(dec.domain, []).append(i)
        for dom, idx in wrong.items():                    # only misrouted passages change their loss
            with live.using(None if dom == BASE else dom) as model:
                for i, loss in zip(idx, passage_losses(model, [ids[i] for i in idx], cfg.eval_batch_size, pad_id,
                                                       progress=False), strict=False):
                    routed[i] = loss
        lo, lr = mean_loss(oracle), mean_loss(routed)
        per_domain[d] = {"n": len(records), "examples": len(ids),
                         "misrouted": sum(adapter_for(dec.domain) != adapter_for(d) for dec in routed_records),
                         "oracle_loss": lo, "routed_loss": lr, "gap_pct": 100 * (lr - lo) / lo}
        all_routed += routed
        all_oracle += oracle
    lo, lr = mean_loss(all_oracle), mean_loss(all_routed)
    return {"per_domain": per_domain, "oracle_loss": lo, "routed_loss": lr, "gap_pct": 100 * (lr - lo) / lo}


def check_targets(report: dict) -> list[dict]:
    """Each target with its measured value, pass/fail and the gap when it fails (never lowered).

    The out-of-domain target is checked on the mean over OOD sources (each source weighs the same),
    which is stricter than the pooled share when easy sources (random strings) are the most numerous."""
    r = report["routing"]
    rows = []
    if r["n_queries"]:
        rows.append(("accuracy_pct", r["accuracy_pct"], ">="))
    if r["ood"]:
        rows.append(("ood_to_base_pct", r["ood_to_base_macro_pct"], ">="))
    rows.append(("latency_p50_ms", r["latency_ms"]["p50"], "<="))
    if report.get("loss"):
        rows.append(("routed_loss_gap_pct", report["loss"]["gap_pct"], "<="))
    out = []
    for name, value, op in rows:
        target = TARGETS[name]
        ok = value >= target if op == ">=" else value <= target
        out.append({"name": name, "target": f"{op} {target:g}", "value": value, "pass": bool(ok),
                    "short_by": 0.0 if ok else abs(value - target)})
    return out


def route_eval(src: Source, corpus: str | Path | None = None, queries: list[tuple[str, Path]] | None = None,
               ood: list[Path] | None = None, loss: bool = False, max_queries: int = 0, max_holdout: int = 100,
               seed: int = 0, n_random: int = 50, builtin_ood: bool = True, command: str = "") -> dict:
    """Evaluate the router of `src` (open_source); returns the report."""
    corpus = Path(corpus) if corpus is not None else None
    if corpus is not None and not corpus.is_dir():
        raise FileNotFoundError(f"{corpus}: no such corpus folder")
    router = src.router
    report = {"source": src.label, "kind": src.kind, "corpus": None if corpus is None else str(corpus),
              "model": router.meta.get("model"), "condition": router.meta.get("condition"),
              "domains": router.names, "adapters": router.adapters,
              "router": {"config": vars(router.cfg),
                         "meta": {k: v for k, v in router.meta.items() if k != "background"},
                         "background": router.meta.get("background"), "summary": router.summary()},
              "settings": {"loss": loss, "max_queries": max_queries, "max_holdout": max_holdout, "seed": seed,
                           "n_random": n_random, "builtin_ood": builtin_ood,
                           "queries": [f"{n}={p}" for n, p in queries or []], "ood": [str(p) for p in ood or []]},
              "command": command, "targets_spec": TARGETS}
    report["routing"] = routing_report(src, corpus, queries or [], ood or [], max_queries, seed, n_random, builtin_ood)
    if loss:
        if src.live is None or corpus is None:
            raise DataError("--loss needs --store and --corpus (holdout passages and adapters)")
        report["loss"] = loss_report(src.live, router, corpus, max_holdout)
    report["targets"] = check_targets(report)
    return report


def format_report(report: dict) -> str:
    r = report["routing"]
    names = report["domains"]
    w = max(8, *(len(n) for n in names + [BASE] + list(r["per_domain"]))) + 2
    enc = report["router"]["meta"].get("encoder") or {}
    lines = [f"crma route-eval: {report['source']}  model={report['model']}  condition={report['condition']}  "
             f"router={report['router']['config']['strategy']} "
             f"encoder={enc.get('name', report['router']['config'].get('encoder'))}"]
    if r["per_domain"]:
        lines.append("accuracy per labelled set (abstaining counts as wrong):")
        for key, v in r["per_domain"].items():
            lines.append(f"  {key:<{w}} {v['accuracy_pct']:6.2f}%  ({v['correct']}/{v['n']}, {v['abstained']} to base)")
        why = ", ".join(f"{k or '?'} {v}" for k, v in sorted(r["in_domain_abstain_reasons"].items()))
        lines.append(f"  {'overall':<{w}} {r['accuracy_pct']:6.2f}%  ({r['n_queries']} queries, "
                     f"{r['in_domain_abstained_pct']:.2f}% abstained{': ' + why if why else ''})")
        lines.append("confusion (rows: true domain, columns: routed to):")
        lines.append(" " * (w + 2) + "".join(c.rjust(w) for c in names + [BASE]))
        for d in names:
            if any(r["confusion"][d].values()):
                lines.append(f"  {d:<{w}}" + "".join(str(r["confusion"][d][c]).rjust(w) for c in names + [BASE]))
    if r["ood"]:
        lines.append("out-of-domain inputs routed to base:")
        for src, v in r["ood"].items():
            extra = f"  others to {v['routed_to']}" if v["routed_to"] else ""
            lines.append(f"  {src:<28} {v['to_base_pct']:6.2f}%  ({v['to_base']}/{v['n']}){extra}")
        lines.append(f"  {'all (pooled)':<28} {r['ood_to_base_pct']:6.2f}%  ({r['n_ood']} inputs)")
        lines.append(f"  {'ood to base':<28} {r['ood_to_base_macro_pct']:6.2f}%  (mean over {len(r['ood'])} sources: "
                     f"the target's measure)")
    lat, cpu = r["latency_ms"], r["latency_cpu_ms"]
    lines.append(f"routing latency per query: p50 {lat['p50']:.2f} ms, p95 {lat['p95']:.2f} ms wall; "
                 f"p50 {cpu['p50']:.2f} ms CPU ({lat['n']} queries, one at a time, {r['torch_threads']} torch threads)")
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
