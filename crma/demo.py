"""`crma demo`: a continual model built domain by domain on the bundled demo data, then used.

1. modular: the four demo domains (three of passages, one of support conversations) are added one at a
   time to a model store (OUT/modular, exactly what `crma add` does; the folder is also a `crma run`);
2. naive: the same domains through one shared adapter (OUT/naive), for comparison;
3. the store answers one question per domain and one off-topic question, routed by its router;
4. a drift table: modular with each adapter on its own backbone version (pinned, how the store
   serves), on the newest backbone (latest, the paper's behaviour), and naive.
"""
from __future__ import annotations

from pathlib import Path

from .config import CRMAConfig, DomainSpec, LoraSettings, RunConfig, TrainConfig
from .data import DEMO_DIR
from .engine.generate import generate
from .engine.live import LiveModel
from .engine.run import continual_run
from .store import Store

DEMO_DOMAINS = ("cooking", "astronomy", "contracts", "support")   # support: conversations (Q&A pairs)
# Sized for about 5 minutes for both conditions with smollm2-135m on 2 CPU cores (see README).
DEMO_DEFAULTS = {"train": TrainConfig(epochs=2, lr=1e-3, batch_size=4, max_len=128, eval_batch_size=8)}
DEMO_QUESTIONS = ("How long should I knead bread dough?", "What is a red giant star?",
                  "The lessee shall indemnify the lessor against all claims.",
                  "My espresso machine shows E1 and will not pull a shot. What should I do?",
                  "Who won the football match yesterday?")


def demo_domains() -> list[DomainSpec]:
    """The demo domains, each with its example queries for the router (`crma add --route-examples`): a
    document domain's passages alone do not look like questions, and a question about bread would go to the
    conversational support domain, whose statistics are built from questions."""
    return [DomainSpec(name, DEMO_DIR / name / "train.jsonl", DEMO_DIR / name / "holdout.jsonl",
                       DEMO_DIR / name / "queries.jsonl") for name in DEMO_DOMAINS]


def run_demo(out: Path, model: str, conditions: list[str], seed: int, train: TrainConfig,
             lora: LoraSettings, crma: CRMAConfig, command: str | None = None,
             questions: tuple[str, ...] = DEMO_QUESTIONS, max_new_tokens: int = 40) -> dict[str, dict]:
    """Run each condition into OUT/<condition>/ (a previous demo there is replaced), answer the
    questions from the modular store, and print the drift table."""
    results = {}
    for condition in conditions:
        folder = Path(out) / condition
        cfg = RunConfig(domains=demo_domains(), out=folder, model=model, condition=condition,
                        seed=seed, train=train, lora=lora, crma=crma)
        print(f"== crma demo: {condition} ({len(cfg.domains)} domains added one at a time, model {model})", flush=True)
        results[condition] = continual_run(cfg, command=command, overwrite=(folder / "config.json").exists())
    served = "modular" if "modular" in results else next(iter(results))
    if questions:
        print(f"\n== the {served} store answers (router picks the adapter; greedy, {max_new_tokens} new tokens)")
        answer_questions(Path(out) / served, questions, max_new_tokens)
    print(drift_table(results))
    return results


def answer_questions(store_dir: Path, questions, max_new_tokens: int) -> list:
    live = LiveModel.open(Store(store_dir))
    answers = []
    for q in questions:
        gen = generate(live, q, domain="auto", temperature=0, max_new_tokens=max_new_tokens)
        conf = f"{gen.confidence:.2f}" if gen.confidence is not None else "-"
        print(f"\nQ: {q}\n[router: {gen.domain}, confidence {conf}"
              + (f", runner-up {gen.runner_up}" if gen.runner_up else "") + "]")
        print("A: " + " ".join(gen.text.split()), flush=True)
        answers.append(gen)
    return answers


def drift_table(results: dict[str, dict]) -> str:
    """Per-domain drift (%) of the prior domains and the mean; '-' where a value does not exist."""
    first = next(iter(results.values()))
    names = first["domains"]
    head = "".ljust(20) + "".join(n.rjust(12) for n in names) + "mean drift".rjust(13) + "  gain (mean)"
    rows = [head]

    def row(label, per_domain, mean, gains):
        cells = [f"{v:+11.2f}%" for v in per_domain] + ["-".rjust(12)] * (len(names) - len(per_domain))
        gain = sum(gains) / len(gains)
        return label.ljust(20) + "".join(cells) + (f"{mean:+12.2f}%" if mean is not None else "-".rjust(13)) \
            + f"{gain:+12.2f}%"

    for cond, res in results.items():
        if res.get("per_domain_drift_pct_pinned") is not None:
            rows.append(row(f"{cond} pinned", res["per_domain_drift_pct_pinned"], res["drift_pct_pinned"],
                            res["gain_pct"]))
            rows.append(row(f"{cond} latest", res["per_domain_drift_pct"], res["drift_pct"], res["gain_pct"]))
        else:
            rows.append(row(cond, res["per_domain_drift_pct"], res["drift_pct"], res["gain_pct"]))
    return "\n".join(["", "drift = loss increase on earlier domains after the last phase (positive = forgetting);",
                      "pinned = each adapter on the backbone version it was trained with (how the store serves),",
                      "latest = every adapter on the newest backbone (the paper's behaviour)"] + rows)
