"""Benchmark report: OUT/summary.json, OUT/report.md and the PNG plots it embeds.

Every number in the report comes from `crma.bench.summary.summarize` over the run folders' results.json
(re-run any time with `crma report --out OUT`); the plots read the same files. Writes are atomic.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..baselines import describe_storage, fmt_bytes
from ..config import BASELINES, CRMAConfig
from ..io import atomic_path, write_json
from .summary import PAPER, PINNED, fmt_range, fmt_stats, load_results, summarize
from .tasks import task_lines, task_plot

COLORS = {"naive": "tab:red", "frozen": "tab:blue", "modular": "tab:green", "modular-pinned": "tab:olive",
          "ewc": "tab:orange", "replay": "tab:purple", "olora": "tab:brown"}
STYLES = {"naive": "-", "frozen": "--", "modular": ":", "modular-pinned": "-.", "ewc": "-", "replay": "--",
          "olora": ":"}


def write_all(out: str | Path) -> dict:
    """Summarise OUT/*/results.json into OUT/summary.json, OUT/report.md and PNGs; returns the summary."""
    out = Path(out)
    results = load_results(out)
    summary = summarize(results)
    write_json(out / "summary.json", summary)
    protocol = None
    if (out / "protocol.json").exists():
        protocol = json.loads((out / "protocol.json").read_text(encoding="utf-8"))
    plots = write_plots(out, summary, results)
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(render(summary, protocol, plots), encoding="utf-8")
    return summary


# ---- plots ------------------------------------------------------------------------------------
def _save(fig, path: Path) -> str:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path.name


def write_plots(out: Path, summary: dict, results: list[dict]) -> list[str]:
    """Loss-matrix heatmap per condition, drift dots per seed, spectral deviation, training-loss curves."""
    import matplotlib.pyplot as plt  # heavy (0.4 s to import): only when plots are drawn

    plt.switch_backend("Agg")           # files only: no display


    conds = summary["conditions"]
    if not conds:
        return []
    names = summary["setup"]["domains"]
    done = sorted((r for r in results if r.get("finished")), key=lambda r: (r["condition"], r["seed"]))
    files = []
    for cond, c in conds.items():                       # loss-matrix heatmaps (mean over seeds)
        L = c["loss_matrix_mean"]
        fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 0.6 * len(L) + 2))
        im = ax.imshow(L, cmap="viridis")
        for i, row in enumerate(L):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set_yticks(range(len(L)), [f"after {n}" for n in names[: len(L)]])
        ax.set_title(f"{cond}: holdout loss L[i][j], mean over {len(c['seeds'])} seed(s)")
        fig.colorbar(im, ax=ax)
        files.append(_save(fig, out / f"loss_matrix_{cond}.png"))
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))            # drift, one dot per seed
    for x, (cond, c) in enumerate(conds.items()):
        if not c["drift"]:
            continue
        vals = c["drift"]["values"]
        xs = [x + 0.1 * (i - (len(vals) - 1) / 2) for i in range(len(vals))]     # side by side, not stacked
        ax.scatter(xs, vals, color=COLORS.get(cond, "k"), zorder=3)
        ax.hlines(c["drift"]["mean"], x - 0.25, x + 0.25, color=COLORS.get(cond, "k"))
        for s, xi, v in zip(c["drift"]["seeds"], xs, vals, strict=False):
            ax.annotate(str(s), (xi, v), xytext=(0, 5), textcoords="offset points", fontsize=6, ha="center")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(range(len(conds)), list(conds))
    ax.set_ylabel("drift % (positive = forgetting)")
    ax.set_title("drift per condition (dot = seed, line = mean)")
    files.append(_save(fig, out / "drift.png"))
    plt.close(fig)

    spectral = [r for r in done if r.get("spectral") and r["spectral"].get("per_step")]
    if spectral:                                        # spectral deviation over logged steps
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for r in spectral:
            per = r["spectral"]["per_step"]
            ax.plot([max(p["norm_dev"], 1e-16) for p in per], lw=0.8, label=f"| ||M||_2 - 1 |, seed {r['seed']}")
            ax.plot([max(p["sum_dev"], 1e-16) for p in per], lw=0.8, ls="--", label=f"max |sum - 1|, seed {r['seed']}")
        ax.set_yscale("log")
        ax.set_xlabel("logged step (all phases; max over layers)")
        ax.set_title(f"{spectral[0]['condition']}: spectral deviation (floored at 1e-16)")
        ax.legend(fontsize=7)
        files.append(_save(fig, out / "spectral.png"))
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.8))            # training loss across phases
    lengths = [len(p) for p in done[0]["loss_curves"]] if done else []
    window = 5 if lengths and min(lengths) >= 10 else 1
    kernel = np.ones(window) / window
    for cond in conds:
        runs = [r["loss_curves"] for r in done if r["condition"] == cond and
                [len(p) for p in r["loss_curves"]] == lengths]
        if not runs:                                    # modular-pinned trains as modular: no curves of its own
            continue
        color, edge = COLORS.get(cond, "k"), 0
        for i, n in enumerate(lengths):                 # smoothed within each phase, never across
            phase = np.array([r[i] for r in runs])      # (seeds, steps of phase i)
            smooth = np.array([np.convolve(c, kernel, mode="valid") for c in phase])   # (seeds, n - window + 1)
            steps = edge + np.arange(smooth.shape[1]) + window - 1
            ax.plot(steps, smooth.mean(0), lw=1.0, color=color, ls=STYLES.get(cond, "-"),
                    label=f"{cond}, mean of {len(runs)} seed(s)" if i == 0 else None)
            if len(runs) > 1:
                ax.fill_between(steps, smooth.min(0), smooth.max(0), color=color, alpha=0.15, lw=0)
            edge += n
    edge = 0
    for name, n in zip(names, lengths, strict=False):
        ax.axvline(edge, color="grey", lw=0.5)
        ax.text(edge + 1, 0.02, name, transform=ax.get_xaxis_transform(), fontsize=7, va="bottom")
        edge += n
    ax.set_xlabel("optimizer step (phases in order)")
    ax.set_ylabel("training loss" + (f" ({window}-step mean)" if window > 1 else ""))
    ax.set_title("training loss: mean over seeds per condition, band = range over seeds", fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    files.append(_save(fig, out / "loss_curves.png"))
    plt.close(fig)
    files += task_plot(out, summary.get("tasks") or {}, names, _save)
    return files


# ---- markdown ---------------------------------------------------------------------------------
def _seeds(s: dict | None, digits: int = 2) -> str:
    return "n/a" if not s else ", ".join(f"{v:+.{digits}f} ({k})"
                                         for k, v in zip(s["seeds"], s["values"], strict=False))


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    def row(cells):      # a literal | (norms, absolute values) would split a markdown cell
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return [row(head), "|" + "---|" * len(head)] + [row(r) for r in rows]


def _crma_settings(protocol: dict) -> str:
    """The CRMA settings that differ from CRMAConfig's defaults, or 'defaults'."""
    default = dataclasses.asdict(CRMAConfig())
    changed = {k: v for k, v in (protocol.get("crma") or {}).items() if default.get(k) != v}
    return ", ".join(f"{k} = {v} (default {default[k]})" for k, v in changed.items()) or "the defaults"


def _commands(protocol: dict) -> list[str]:
    return protocol.get("commands") or [protocol["command"]]


def render(summary: dict, protocol: dict | None, plots: list[str]) -> str:
    """report.md text from a summary (and the protocol.json of the grid, when there is one)."""
    lines = ["# crma benchmark report", ""]
    runs = summary["runs"]
    if protocol:
        grid = protocol.get("grid", [])
        lines += [f"Protocol **{protocol['name']}**: model `{protocol['model']}`, domains "
                  f"{', '.join(protocol['domains'])} (in order), {protocol['train_passages']} train / "
                  f"{protocol['holdout_passages']} holdout passages per domain, max_len {protocol['max_len']}, "
                  f"{protocol['epochs']} epoch(s), lr {protocol['lr']}, batch {protocol['batch_size']}; "
                  f"corpus `{protocol['corpus']}`. CRMA settings: {_crma_settings(protocol)}.", "",
                  "Made by" + ("" if len(_commands(protocol)) == 1 else " (each filled in part of the grid)")
                  + ":", ""] + [f"    {c}" for c in _commands(protocol)] + [""]
        missing = [f"{c}-seed{s}" for c, s in grid
                   if not any(r["condition"] == c and r["seed"] == s and r["finished"] for r in runs)]
        if missing:
            lines += [f"**Partial grid**: {len(grid) - len(missing)} of {len(grid)} runs finished; "
                      f"missing: {', '.join(missing)}. Numbers below use the finished runs only.", ""]
    lines += ["All numbers are computed by `crma.bench.summary.summarize` from the run folders' results.json; "
              "recompute with `crma report --out DIR`. Drift is loss-relative (docs/method.md section 4): "
              "positive = forgetting. ± is the sample standard deviation over seeds.", ""]
    conds, comp = summary["conditions"], summary["comparisons"]
    if not conds:
        return "\n".join(lines + ["No finished runs yet.", ""])
    setup = summary["setup"]
    names = setup["domains"]
    lines += ["## Forgetting", "",
              f"`{PINNED}` is the modular runs as the model store serves them: each adapter on the backbone "
              "version it was trained with (measured in results.json since the store; derived exactly from the "
              "loss matrix's diagonal for older runs). `modular` is every adapter on the newest backbone.", ""]
    rows = []
    for cond, c in conds.items():
        ret = c["retention"]
        lo, hi = ret["wilson95"]
        rows.append([cond, fmt_stats(c["drift"]), _seeds(c["drift"]), fmt_range(c["drift"]),
                     fmt_stats(c["bwt"], 4, ""),
                     f"{ret['k']}/{ret['n']} [{lo:.3f}, {hi:.3f}]"])
    lines += _table(["condition", "drift mean ± sd", "per seed (seed)", "[min, max]", "BWT (loss units)",
                     "retained k/n [Wilson 95%]"], rows) + [""]
    if "naive_modular_disjoint" in comp:
        lines += [f"Naive's and modular's per-seed drift ranges are "
                  f"**{'disjoint' if comp['naive_modular_disjoint'] else 'overlapping'}**.", ""]
    lines += ["Retention pools the prior-domain holdout passages of all seeds (the same passages at each "
              "seed); a passage is retained if its loss after the last phase is <= 1.01 x its loss right "
              "after its own domain's phase.", "", "### Per-domain drift (%)", ""]
    lines += _table(["domain"] + list(conds),
                    [[n] + [fmt_stats(c["per_domain_drift"].get(n)) for c in conds.values()]
                     for n in names[:-1]]) + [""]
    lines += ["### Gain over base per domain (%)", "", "gain_j = 100 (Lbase[j] - L[j][j]) / Lbase[j].", ""]
    lines += _table(["domain"] + list(conds),
                    [[n] + [fmt_stats(c["gain"].get(n)) for c in conds.values()] for n in names]
                    + [["mean over domains"] + [fmt_stats(c["gain_mean"]) for c in conds.values()]]) + [""]
    lines += task_lines(summary.get("tasks") or {}, names)
    advs = [(label, comp[key]) for key, label in (("advantage_modular_over_frozen", "modular (latest backbone)"),
                                                  ("advantage_pinned_over_frozen", "modular pinned"))
            if comp.get(key)]
    if advs:
        lines += ["## Learning advantage of modular over frozen (same seed)", "",
                  "100 mean_j (L_frozen[T-1][j] - L_modular[T-1][j]) / L_frozen[T-1][j]. `latest`: every adapter on "
                  "the newest backbone (the paper's behaviour); `pinned`: every adapter on the backbone version it "
                  "was trained with (how the model store serves, zero drift by construction), so its advantage is "
                  "what the backbone adds to learning alone.", ""]
        lines += _table(["backbone", "over", "mean ± sd", "per seed (seed)", "positive at every seed"],
                        [[label, scope + (" domains" if scope == "all" else " domains (j < T-1)"), fmt_stats(a),
                          _seeds(a), "yes" if a["positive_every_seed"] else "no"]
                         for label, adv in advs for scope, a in adv.items()]) + [""]
    spec = {c: v["spectral"] for c, v in conds.items() if v["spectral"]}
    if spec:
        lines += ["## Spectral certificate", ""]
        lines += _table(["condition", "logged steps x layers", "max | ||M||_2 - 1 |", "max |row/col sum - 1|",
                         "max ||M||_2", "max |alpha| ||M||_2 (rho)", "certificate held everywhere"],
                        [[c, f"{s['logged_steps']} x {s['layers']}", f"{s['max_norm_dev']:.2e}",
                          f"{s['max_sum_dev']:.2e}", f"{s['max_norm']:.9f}",
                          f"{s['max_alpha_times_norm']:.4f} ({s['rho']})", "yes" if s["certificate_ok"] else "**NO**"]
                         for c, s in spec.items()]) + [""]
    lines += ["## Training cost and gradients", ""]
    lines += _table(["condition", "tokens/s mean ± sd", "train seconds mean", "optimizer steps / run",
                     "grad-norm peak (max over seeds)", "grad-norm mean ± sd"],
                    [[cond, fmt_stats(c["tokens_per_s"], 1, "", ""), f"{c['train_seconds']['mean']:.1f}",
                      ", ".join(map(str, sorted(set(c["optimizer_steps"])))),
                      "n/a" if c["grad_norm"]["max_peak"] is None else f"{c['grad_norm']['max_peak']:.3f}",
                      fmt_stats(c["grad_norm"]["mean"], 3, "", "")] for cond, c in conds.items()]) + [""]
    over = comp.get("crma_time_overhead_pct")
    if over:
        lines += [f"CRMA time overhead (modular / frozen train seconds - 1, same seed): {fmt_stats(over, 1)} "
                  f"(per seed {_seeds(over, 1)}). Grad norms are the total LoRA (+ CRMA) norm before clipping.", ""]
    lines += _stores_section(conds, names)
    lines += ["## The paper beside this run", "",
              f"Paper: {PAPER['model']}, {PAPER['train_passages']} train / {PAPER['holdout_passages']} holdout "
              f"passages per domain, seeds {', '.join(map(str, PAPER['seeds']))}. This run: `{setup['model']}`, "
              f"{setup['train_passages']} / {setup['holdout_passages']} passages, max_len {setup['max_len']}, "
              f"{setup['epochs']} epoch(s), lr {setup['lr']}.", ""]
    lines += _table(["metric", "paper", "this run", "difference"],
                    [[r["metric"], r["paper"], r["ours"], r["sentence"]] for r in summary["paper_comparison"]]) + [""]
    measured = [(c, conds[c]["drift"]) for c in BASELINES if (conds.get(c) or {}).get("drift")]
    lines += [f"The paper also reports single-adapter continual-learning stacks (EWC, replay, orthogonal LoRA, "
              f"distillation) at +{PAPER['single_adapter_forgetting_pct'][0]:.0f}% to "
              f"+{PAPER['single_adapter_forgetting_pct'][1]:.0f}% forgetting on a 4-domain protocol; "
              + ("measured here on the same data, order, seeds and LoRA settings: "
                 + ", ".join(f"{c} {fmt_stats(d)}" for c, d in measured)
                 + "".join(f", {c} {fmt_stats(conds[c]['drift'])}" for c in ("naive", "modular")
                           if (conds.get(c) or {}).get("drift"))
                 + " (the baselines' row above and the section on what each condition stores)."
                 if measured else "this grid has no baseline runs (`--conditions ewc,replay,olora` adds them)."), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _core_stores(cond: str, T: int, one: str) -> str:
    """What a core condition keeps (no storage dict in its results.json: it is fixed by the design)."""
    if cond == "naive":
        return f"1 shared LoRA{one}; no data"
    if cond == "frozen":
        return f"{T} LoRA adapters{one}, one per domain, routed; no data"
    return (f"{T} LoRA adapters{one} + the CRMA backbone ({T} versions in the store), routed; no data"
            + (" (each adapter on its own backbone version)" if cond == PINNED else ""))


def _stores_section(conds: dict, names: list[str]) -> list[str]:
    """Per condition: drift, final loss per domain, gain, time, and what it must store."""
    T = len(names)
    sized = next((c["storage"] for c in conds.values() if c.get("storage")), None)
    one = f" ({sized['adapter_params']:,} params, {fmt_bytes(sized['adapter_bytes'])} fp32 each)" if sized else ""
    rows = []
    for cond, c in conds.items():
        stores = describe_storage(c["storage"]) if c.get("storage") else _core_stores(cond, T, one)
        extra = c.get("extra_seconds") or {}
        rows.append([cond, fmt_stats(c["drift"])] + [f"{c['final_loss'][n]['mean']:.4f}" for n in names]
                    + [fmt_stats(c["gain_mean"]), f"{c['train_seconds']['mean']:.1f}",
                       f"{extra['mean']:.1f}" if extra.get("mean") else "-", stores])
    lines = ["## What each condition costs and keeps", "",
             "Same data, order, seeds, LoRA settings and LoRA initialisation for every condition. Final loss: "
             "holdout loss of each domain after the last phase (mean over seeds; olora on its summed adapters, "
             "the others on each domain's adapter). Extra seconds: time outside the training steps a method "
             "needs (EWC's Fisher, replay's reservoir). Baselines: `crma/baselines/`; replay trains "
             "1 / (1 - ratio) times the steps of the others (its replayed passages come on top).", ""]
    lines += _table(["condition", "drift"] + [f"final loss {n}" for n in names]
                    + ["mean gain", "train s", "extra s", "what it stores"], rows) + [""]
    per_seed = [(cond, c["storage_per_seed"]) for cond, c in conds.items() if c.get("storage_per_seed")]
    if any(len(s) > 1 for _, s in per_seed):
        lines += ["Stored per seed: " + "; ".join(f"{cond} seed {s['seed']}: {describe_storage(s)}"
                                                  for cond, ss in per_seed for s in ss[1:]) + ".", ""]
    return lines
