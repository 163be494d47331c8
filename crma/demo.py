"""`crma demo`: a short continual run on the bundled demo data, naive vs modular, with a drift table."""
from __future__ import annotations

from pathlib import Path

from .config import CRMAConfig, DomainSpec, LoraSettings, RunConfig, TrainConfig

DEMO_DIR = Path(__file__).parent / "demo_data"
DEMO_DOMAINS = ("cooking", "astronomy", "contracts")
# Sized for about 10 minutes for two conditions with smollm2-135m on 2 CPU cores (see README).
DEMO_DEFAULTS = {"train": TrainConfig(epochs=2, lr=1e-3, batch_size=4, max_len=128, eval_batch_size=8)}


def demo_domains() -> list[DomainSpec]:
    return [DomainSpec(name, DEMO_DIR / name / "train.jsonl", DEMO_DIR / name / "holdout.jsonl")
            for name in DEMO_DOMAINS]


def run_demo(out: Path, model: str, conditions: list[str], seed: int, train: TrainConfig,
             lora: LoraSettings, crma: CRMAConfig, command: str | None = None) -> dict[str, dict]:
    """Run each condition into OUT/<condition>/ and print a side-by-side drift table."""
    from .run import continual_run

    results = {}
    for condition in conditions:
        cfg = RunConfig(domains=demo_domains(), out=Path(out) / condition, model=model, condition=condition,
                        seed=seed, train=train, lora=lora, crma=crma)
        print(f"== crma demo: {condition} ({len(cfg.domains)} domains, model {model})")
        results[condition] = continual_run(cfg, command=command)
    print(drift_table(results))
    return results


def drift_table(results: dict[str, dict]) -> str:
    """Conditions side by side: per-domain drift (%) of prior domains and the mean."""
    first = next(iter(results.values()))
    prior = first["domains"][:-1]
    head = "condition".ljust(10) + "".join(n.rjust(12) for n in prior) + "mean drift".rjust(13) + "  gain (mean)"
    rows = [head]
    for cond, res in results.items():
        gain = sum(res["gain_pct"]) / len(res["gain_pct"])
        rows.append(cond.ljust(10) + "".join(f"{v:+11.2f}%" for v in res["per_domain_drift_pct"])
                    + f"{res['drift_pct']:+12.2f}%" + f"{gain:+12.2f}%")
    return "\n".join(["", "drift = loss increase on earlier domains after the last phase (positive = forgetting)"] + rows)
