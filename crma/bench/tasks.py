"""The benchmark's task scores: accuracy matrices, ACC/BWT/FWT per condition with 95% intervals across seeds.

Each finished run that scored task sets (`crma run --tasks`, the protocols' `tasks.jsonl`) gives one
accuracy matrix A (A[i][j]: task score of domain j after phase i) and the base model's scores b. Per
condition (modular twice: `modular-pinned` as the store serves it, `modular` on the latest backbone):

    ACC, BWT, FWT of each seed's A (crma.tasks.metrics), then their mean over seeds with a Student-t 95%
    interval: each seed is one observation; items are never pooled across seeds.

An off-domain set (general English) gives the base model's score and the routed score after the last phase.
"""
from __future__ import annotations

from pathlib import Path

from ..tasks import average_accuracy, backward_transfer, forward_transfer, seed_interval

PINNED = "modular-pinned"


def _views(res: dict) -> list[tuple[str, list]]:
    """(condition label, accuracy matrix) of one finished run: modular gives both of its views."""
    if res["condition"] == "modular" and res.get("task_matrix_pinned"):
        return [(PINNED, res["task_matrix_pinned"]), ("modular", res["task_matrix"])]
    return [(res["condition"], res["task_matrix"])]


def task_summary(results: list[dict]) -> dict:
    """{condition: {acc, bwt, fwt: seed intervals, matrix: mean over seeds, seeds, general}} of finished runs."""
    per: dict[str, list[dict]] = {}
    for res in results:
        if not res.get("finished") or not res.get("task_matrix"):
            continue
        base = [res["task_base"].get(n) for n in res["domains"]]
        for cond, A in _views(res):
            general = {n: {"base": g["base"], "routed": g["routed"][-1]["score"] if g["routed"] else None}
                       for n, g in res.get("task_general", {}).items()}
            per.setdefault(cond, []).append({"seed": res["seed"], "A": A, "base": base, "acc": average_accuracy(A),
                                             "bwt": backward_transfer(A), "fwt": forward_transfer(A, base),
                                             "general": general})
    out = {}
    for cond, runs in per.items():
        runs.sort(key=lambda r: r["seed"])
        T = len(runs[0]["A"])
        mean = [[_mean([r["A"][i][j] for r in runs]) for j in range(T)] for i in range(T)]
        entry = {"seeds": [r["seed"] for r in runs], "matrix": mean, "base": [_mean([r["base"][j] for r in runs])
                                                                            for j in range(T)]}
        for m in ("acc", "bwt", "fwt"):
            values = [r[m] for r in runs if r[m] is not None]
            entry[m] = {**seed_interval(values), "values": values} if values else None
        names = sorted({n for r in runs for n in r["general"]})
        entry["general"] = {n: {"base": _mean([r["general"][n]["base"] for r in runs]),
                                "routed": _mean([r["general"][n]["routed"] for r in runs
                                                 if r["general"][n]["routed"] is not None])} for n in names}
        out[cond] = entry
    return out


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _ci(s: dict | None) -> str:
    if s is None:
        return "-"
    if s["low"] is None:
        return f"{s['mean']:+.3f} (1 seed)"
    return f"{s['mean']:+.3f} [{s['low']:+.3f}, {s['high']:+.3f}]"


def task_lines(tasks: dict, names: list[str]) -> list[str]:
    """The report's section: ACC/BWT/FWT per condition, the off-domain check, the final-row scores."""
    if not tasks:
        return []
    lines = ["## Task scores (behaviour, not loss)", "",
             "Per item: a multiple-choice continuation or answer picked right (length-normalised log-likelihood) "
             "or a free-form answer's token F1; task score = the mean over a domain's items. ACC = mean final "
             "score; BWT = mean (final - right after own training), negative = forgetting; FWT = mean (score "
             "before own training - base model). Intervals: Student-t 95% across seeds (one value per seed).", "",
             "| condition | seeds | ACC | BWT | FWT | " + " | ".join(f"final {n}" for n in names) + " |",
             "|---" * (5 + len(names)) + "|"]
    for cond, t in tasks.items():
        final = t["matrix"][-1]
        lines.append(f"| {cond} | {', '.join(map(str, t['seeds']))} | {_ci(t['acc'])} | {_ci(t['bwt'])} | "
                     f"{_ci(t['fwt'])} | " + " | ".join(f"{v:.3f}" if v is not None else "-" for v in final) + " |")
    base = next(iter(tasks.values()))["base"]
    lines += ["| base model | | | | | " + " | ".join(f"{v:.3f}" if v is not None else "-" for v in base) + " |", ""]
    general = {c: t["general"] for c, t in tasks.items() if t["general"]}
    if general:
        lines += ["Off-domain check (general English; the router picks per item, as for a user's request):", "",
                  "| condition | set | base model | routed after the last phase |", "|---|---|---|---|"]
        for cond, g in general.items():
            for n, v in g.items():
                routed = f"{v['routed']:.3f}" if v["routed"] is not None else "-"
                lines.append(f"| {cond} | {n} | {v['base']:.3f} | {routed} |")
        lines.append("")
    return lines


def task_plot(out: Path, tasks: dict, names: list[str], save) -> list[str]:
    """One heatmap per condition of the mean accuracy matrix (rows: after phase i; columns: task j)."""
    import matplotlib.pyplot as plt  # heavy: only when plots are drawn

    if not tasks:
        return []
    conds = list(tasks)
    cols = min(4, len(conds))
    rows = -(-len(conds) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols + 1.2, 3.0 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(conds):
            ax.axis("off")
            continue
        cond = conds[k]
        M = [[v if v is not None else float("nan") for v in row] for row in tasks[cond]["matrix"]]
        im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(cond, fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_yticks(range(len(names)), [f"after {n}" for n in names] if k % cols == 0 else [], fontsize=7)
        for i, row in enumerate(M):
            for j, v in enumerate(row):
                if v == v:                                  # not NaN; dark text on the bright end of viridis
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="k" if v > 0.6 else "w")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="task score")
    name = save(fig, out / "task_matrices.png")
    plt.close(fig)
    return [name]
