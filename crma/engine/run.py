"""The continual run: train domains in order under one condition; evaluate after every phase.

    naive    one shared LoRA adapter, trained on every domain in turn      base + shared LoRA
    frozen   a fresh LoRA adapter per domain                              base + LoRA_t
    modular  a fresh LoRA adapter per domain + the CRMA backbone trains   base + CRMA_v + LoRA_t
    ewc, replay, olora   continual-learning baselines (crma/baselines): a Method object made per run
             holds their state across phases; olora is evaluated with every trained adapter summed

A run is a model store (crma/store) plus its results: each phase is `crma.engine.add.add_domain` on
one in-memory model, so DIR is a store that `crma generate`, `eval` and `add` use as they are. After
every phase it evaluates every domain twice in modular: on the newest backbone (`latest`, the paper's
behaviour: loss_matrix) and on the backbone version each adapter was trained with (`pinned`, how the
store serves: loss_matrix_pinned). DIR/results.json is rewritten after every phase (partial until
`finished` is true), beside DIR/config.json and DIR/spectral_log.jsonl.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from accelerate.utils import set_seed

from .. import runtime
from ..baselines import Method, describe_storage, make_method
from ..config import BASELINES, SHARED_ADAPTER_CONDITIONS, ConfigError, RunConfig
from ..data import DomainData
from ..io import command_line, write_json, write_text
from ..routing import RouterConfig
from ..store import creation_settings
from ..version import __version__
from . import metrics
from .add import AddSettings, add_domain, evaluate, load_spec
from .live import LiveModel
from .loss import mean_loss
from .run_tasks import RunTasks
from .train import PhaseLog


def prepare_out(out: Path, cfg: RunConfig, overwrite: bool) -> None:
    """An empty (or missing) DIR, or the same run left unfinished (started again), or --overwrite;
    anything else is refused, so no earlier run's files (an old backbone, adapters) can leak in."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    config, results = out / "config.json", out / "results.json"
    same = False
    try:
        same = _identity(json.loads(config.read_text(encoding="utf-8"))) == _identity(cfg.to_dict())
        done = json.loads(results.read_text(encoding="utf-8")).get("finished") if results.exists() else False
    except (OSError, ValueError):
        done = False
    if overwrite or (same and not done):
        shutil.rmtree(out)
        return
    what = "this finished run" if same and done else "other files (another run or store)"
    raise ConfigError(f"--out: {out} already holds {what}; pass --overwrite to replace it, or choose another folder")


def _identity(config: dict) -> dict:
    """A run's settings without where it ran (device, processes): restarting elsewhere is the same run."""
    return {k: v for k, v in config.items() if k not in ("device", "runtime")}


def store_creation(cfg: RunConfig, fingerprint: dict, router_cfg: RouterConfig | None) -> dict:
    """`create` of the run's store. A baseline's store is laid out as naive's (one shared adapter) or frozen's
    (one per domain), under its own condition name and with its settings; `crma add` refuses it."""
    like = cfg.condition
    if cfg.condition in BASELINES:
        like = "naive" if cfg.condition in SHARED_ADAPTER_CONDITIONS else "frozen"
    create = creation_settings(like, cfg.model, fingerprint, seed=cfg.seed, crma=cfg.crma, lora=cfg.lora,
                               router=router_cfg)
    if cfg.condition in BASELINES:
        create["condition"] = cfg.condition
        create["settings"]["cl"] = dataclasses.asdict(cfg.cl)
    return create


def spectral_summary(logs: list[PhaseLog], rho: float) -> dict:
    """Maxima over all logged steps and layers, plus per-step maxima over layers for plotting."""
    steps = [layers for log in logs for layers in log.spectral]
    if not steps:
        return {}
    per_step = [{"norm_dev": max(s["norm_dev"] for s in layers),
                 "sum_dev": max(max(s["row_dev"], s["col_dev"]) for s in layers),
                 "alpha": max(abs(s["alpha"]) for s in layers),
                 "bound": max(abs(s["alpha"]) * s["norm"] for s in layers),
                 "norm": max(s["norm"] for s in layers)} for layers in steps]
    worst = {k: max(p[k] for p in per_step) for k in per_step[0]}
    return {"steps": sum(len(log.losses) for log in logs), "layers": len(steps[0]), "rho": rho,
            "max_norm_dev": worst["norm_dev"], "max_sum_dev": worst["sum_dev"],
            "max_norm": worst["norm"], "max_alpha": worst["alpha"], "max_alpha_times_norm": worst["bound"],
            "certificate_ok": metrics.certificate_ok(worst["norm"], worst["bound"], rho),
            "per_step": per_step}


def _per_passage(matrix: list) -> list:
    return [[[s / n for s, n in cell] for cell in row] for row in matrix]


def build_results(cfg: RunConfig, command: str, base: list, matrix: list, logs: list[PhaseLog],
                  names: list[str], finished: bool, pinned: list | None = None,
                  backbone_versions: list | None = None, storage: dict | None = None) -> dict:
    """results.json content from the losses so far (per-passage losses kept for the probes)."""
    L = [[mean_loss(cell) for cell in row] for row in matrix]
    base_loss = [mean_loss(cell) for cell in base]
    res = {"model": cfg.model, "condition": cfg.condition, "seed": cfg.seed, "domains": names,
           "finished": finished, "phases_done": len(L), "base_loss": base_loss, "loss_matrix": L}
    P = [[mean_loss(cell) for cell in row] for row in pinned] if pinned is not None else None
    if P is not None:
        res["loss_matrix_pinned"] = P
        res["backbone_versions"] = backbone_versions
    if finished:
        res.update({"drift_pct": metrics.drift(L), "per_domain_drift_pct": metrics.per_domain_drift(L),
                    "gain_pct": metrics.gain(base_loss, L), "bwt": metrics.bwt(L),
                    "retention": metrics.retention(_per_passage(matrix))})
        if P is not None:
            res.update({"drift_pct_pinned": metrics.drift(P),
                        "per_domain_drift_pct_pinned": metrics.per_domain_drift(P),
                        "bwt_pinned": metrics.bwt(P), "retention_pinned": metrics.retention(_per_passage(pinned))})
    res.update({
        "passage_losses": {"base": [[s / n for s, n in cell] for cell in base], "after_phase": _per_passage(matrix),
                           **({"after_phase_pinned": _per_passage(pinned)} if pinned is not None else {})},
        "train_tokens": sum(log.tokens for log in logs),
        "train_seconds": sum(log.seconds for log in logs),
        "phases": [log.summary() for log in logs],
        "grad_norm": [{"peak": s["grad_norm_peak"], "mean": s["grad_norm_mean"]}
                      for s in (log.summary() for log in logs)],
        "loss_curves": [log.losses for log in logs],
        "spectral": spectral_summary(logs, cfg.crma.rho) if cfg.condition == "modular" else None,
        "config": cfg.to_dict(), "command": command, "version": __version__,
    })
    if storage is not None:                     # a baseline: what it keeps beyond its adapters
        res["storage"] = storage
    res["tokens_per_s"] = res["train_tokens"] / res["train_seconds"] if res["train_seconds"] else 0.0
    return res


def continual_run(cfg: RunConfig, command: str | None = None, progress: bool = True,
                  router_cfg: RouterConfig | None = None, overwrite: bool = False) -> dict:
    """Run every phase of `cfg` into the store DIR = cfg.out; returns (and writes) the results.
    Each phase adds its domain to the store (adapter, backbone version, router) exactly as `crma add`."""
    command = command or command_line()
    out = Path(cfg.out)
    accelerator = runtime.accelerator(cfg.device)       # first: under a launcher, join the process group
    placed = runtime.describe(cfg.device)

    def start() -> None:
        prepare_out(out, cfg, overwrite)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {**cfg.to_dict(), "runtime": placed})

    runtime.on_main(start)
    names = [spec.name for spec in cfg.domains]
    tasks = RunTasks(cfg.tasks, names, cfg.task, progress, cfg.device.fsdp) if cfg.tasks else None  # read first
    set_seed(cfg.seed)
    live = LiveModel.fresh(cfg.model, cfg.condition, seed=cfg.seed, device=cfg.device)
    settings = AddSettings(seed=cfg.seed, train=cfg.train, lora=cfg.lora, crma=cfg.crma, min_gain=None)
    data = [load_spec(spec, live.tokenizer, cfg.train) for spec in cfg.domains]
    if progress and runtime.is_main():
        for d in data:
            print(f"{d.name}: train {d.stats['train'].line()}; holdout {d.stats['holdout'].line()}", flush=True)
    with live.untouched():
        base = [evaluate(live, d, settings, progress) for d in data]     # the untouched base model
    if tasks is not None:
        tasks.score_base(live)
    method = make_method(cfg.condition, cfg.cl, cfg.seed, len(cfg.domains))
    create = store_creation(cfg, live.base_fingerprint, router_cfg)
    modular = cfg.condition == "modular"
    latest, pinned, logs, versions = [], [], [], []
    for i, dom in enumerate(data):
        added = add_domain(live, out, dom, settings, method, command=command, router_cfg=router_cfg,
                           accelerator=accelerator, progress=progress, create=create, base=base[i])
        logs.append(added.log)
        versions.append(added.backbone_version)
        latest.append(evaluate_row(live, data, i, "latest", settings, progress, method))
        if modular:
            pinned.append(evaluate_row(live, data, i, "pinned", settings, progress, method))
        if tasks is not None:
            tasks.score_phase(live, i, method)
            if i == len(data) - 1:
                tasks.score_routed(live, method)
        results = build_results(cfg, command, base, latest, logs, names, i == len(data) - 1,
                                pinned if modular else None, versions if modular else None,
                                method.storage())
        results["runtime"] = placed
        if tasks is not None:
            results.update(tasks.results(i == len(data) - 1, modular))
        results["data"] = {d.name: {part: dataclasses.asdict(st) for part, st in d.stats.items()} for d in data}
        runtime.on_main(write_json, out / "results.json", results)
    if modular:
        runtime.on_main(write_text, out / "spectral_log.jsonl",
                        "".join(json.dumps({"phase": p, "step": s, "layers": layers}) + "\n"
                                for p, log in enumerate(logs) for s, layers in enumerate(log.spectral)))
    if progress and runtime.is_main():
        print(format_table(results))
    return results


def evaluate_row(live: LiveModel, data: list[DomainData], phase: int, backbone: str, settings: AddSettings,
                 progress: bool, method: Method) -> list:
    """Per-passage losses of every domain after `phase`: trained domains with their own adapter on the
    `backbone` version (pinned or latest), later ones with no domain adapter. olora (method.summed): every
    domain on the one model it serves, all adapters trained so far summed (no router)."""
    row = []
    for j, dom in enumerate(data):
        with method.serving(live, None) if method.summed else live.using(dom.name if j <= phase else None, backbone):
            row.append(evaluate(live, dom, settings, progress))
    return row


def format_table(res: dict) -> str:
    """Compact text table: base loss, loss after each phase, drift and gain per domain."""
    names = res["domains"]
    w = max(8, *(len(n) for n in names)) + 2
    lines = [f"crma run: {res['model']}  condition={res['condition']}  seed={res['seed']}",
             "loss".ljust(14) + "".join(n.rjust(w) for n in names),
             "base".ljust(14) + "".join(f"{v:{w}.4f}" for v in res["base_loss"])]
    for i, row in enumerate(res["loss_matrix"]):
        lines.append(f"after {names[i]}"[:14].ljust(14) + "".join(f"{v:{w}.4f}" for v in row))
    if res.get("finished"):
        lines.append("drift %".ljust(14) + "".join(f"{v:{w}.2f}" for v in res["per_domain_drift_pct"]) + "-".rjust(w))
        if res.get("per_domain_drift_pct_pinned") is not None:
            lines.append("drift % pinned".ljust(14) + "".join(f"{v:{w}.2f}" for v in res["per_domain_drift_pct_pinned"])
                         + "-".rjust(w))
        lines.append("gain %".ljust(14) + "".join(f"{v:{w}.2f}" for v in res["gain_pct"]))
        if res["drift_pct"] is not None:
            pinned = res.get("drift_pct_pinned")
            lines.append(f"drift (mean over prior domains): {res['drift_pct']:+.2f}%"
                         + (" on the latest backbone, " + f"{pinned:+.2f}% pinned (how the store serves)"
                            if pinned is not None else ""))
        if res.get("spectral"):
            s = res["spectral"]
            lines.append(f"spectral: max | ||M||_2 - 1 | = {s['max_norm_dev']:.2e}, max sum dev = "
                         f"{s['max_sum_dev']:.2e}, certificate {'held' if s['certificate_ok'] else 'FAILED'} "
                         f"over {s['steps']} steps x {s['layers']} layers")
    if res.get("task_matrix"):
        lines += _task_lines(res, names, w)
    if res.get("storage"):
        lines.append(f"stores: {describe_storage(res['storage'])}")
    lines.append(f"train: {res['train_tokens']} tokens in {res['train_seconds']:.1f}s "
                 f"({res['tokens_per_s']:.1f} tokens/s)")
    return "\n".join(lines)


def _task_lines(res: dict, names: list[str], w: int) -> list[str]:
    """The accuracy matrix (pinned where there is one: how the store serves), ACC/BWT/FWT, off-domain sets."""
    key = "task_matrix_pinned" if res.get("task_matrix_pinned") else "task_matrix"

    def cells(values) -> str:
        return "".join(f"{v:{w}.4f}" if v is not None else "-".rjust(w) for v in values)

    lines = [f"task score ({'pinned' if key.endswith('pinned') else 'latest'})".ljust(14)
             + "".join(n.rjust(w) for n in names),
             "base".ljust(14) + cells(res["task_base"].get(n) for n in names)]
    lines += [f"after {names[i]}"[:14].ljust(14) + cells(row) for i, row in enumerate(res[key])]
    suffix = "_pinned" if key.endswith("pinned") else ""
    if res.get(f"task_acc{suffix}") is not None:
        lines.append("tasks: " + ", ".join(f"{label} {res[f'task_{m}{suffix}']:+.4f}" if res[f"task_{m}{suffix}"]
                                           is not None else f"{label} -"
                                           for m, label in (("acc", "ACC"), ("bwt", "BWT"), ("fwt", "FWT"))))
    for name, g in res.get("task_general", {}).items():
        last = g["routed"][-1] if g["routed"] else None
        if last:
            lines.append(f"off-domain {name}: base {g['base']:.4f}, routed {last['score']:.4f} "
                         f"(served: {', '.join(f'{d} {n}' for d, n in last['served'].items())})")
    return lines
