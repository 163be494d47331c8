"""The continual run: train domains in order under one condition; evaluate after every phase.

    naive    one shared LoRA adapter, trained on every domain in turn      base + shared LoRA
    frozen   a fresh LoRA adapter per domain                              base + LoRA_t
    modular  a fresh LoRA adapter per domain + the CRMA backbone trains   base + CRMA + LoRA_t

Writes DIR/results.json after every phase (partial until `finished` is true), the adapters,
the backbone and DIR/config.json.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from . import __version__
from .bench import metrics
from .method.adapters import SHARED, add_adapter, active, save_adapter, set_trainable
from .method.backbone import CRMABackbone
from .config import RunConfig
from .data import read_passages, split_holdout, tokenize
from .evaluate import mean_loss, passage_losses
from .routing.features import domain_features, resolve_layer
from .io import command_line, write_json
from .method.models import fingerprint, load_model
from .routing.router import Router, RouterConfig
from .train import PhaseLog, train_phase


@dataclass
class DomainData:
    name: str
    train: list[list[int]]
    holdout: list[list[int]]
    train_texts: list[str] = field(default_factory=list)     # raw text, only for building the router
    holdout_texts: list[str] = field(default_factory=list)   # (never stored: the router keeps statistics)


def load_domains(cfg: RunConfig, tokenizer) -> list[DomainData]:
    """Read and tokenise every domain; hold out a deterministic fraction when no holdout file is given."""
    out = []
    for spec in cfg.domains:
        train = read_passages(spec.train, spec.name)
        if spec.holdout is not None:
            holdout = read_passages(spec.holdout, spec.name)
        else:
            train, holdout = split_holdout(train, cfg.train.holdout_fraction)
        if cfg.train.max_passages:
            train = train[: cfg.train.max_passages]
        if cfg.train.max_holdout:
            holdout = holdout[: cfg.train.max_holdout]
        out.append(DomainData(spec.name, tokenize(train, tokenizer, cfg.train.max_len),
                              tokenize(holdout, tokenizer, cfg.train.max_len), train, holdout))
    return out


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


def build_results(cfg: RunConfig, command: str, base: list, matrix: list, logs: list[PhaseLog],
                  names: list[str], finished: bool) -> dict:
    """results.json content from the losses so far (per-passage losses kept for the probes)."""
    L = [[mean_loss(cell) for cell in row] for row in matrix]
    after_phase = [[[s / n for s, n in cell] for cell in row] for row in matrix]   # per-passage means
    base_loss = [mean_loss(cell) for cell in base]
    res = {"model": cfg.model, "condition": cfg.condition, "seed": cfg.seed, "domains": names,
           "finished": finished, "phases_done": len(L), "base_loss": base_loss, "loss_matrix": L}
    if finished:
        res.update({"drift_pct": metrics.drift(L), "per_domain_drift_pct": metrics.per_domain_drift(L),
                    "gain_pct": metrics.gain(base_loss, L), "bwt": metrics.bwt(L),
                    "retention": metrics.retention(after_phase)})
    res.update({
        "passage_losses": {"base": [[s / n for s, n in cell] for cell in base], "after_phase": after_phase},
        "train_tokens": sum(log.tokens for log in logs),
        "train_seconds": sum(log.seconds for log in logs),
        "phases": [log.summary() for log in logs],
        "grad_norm": [{"peak": s["grad_norm_peak"], "mean": s["grad_norm_mean"]}
                      for s in (log.summary() for log in logs)],
        "loss_curves": [log.losses for log in logs],
        "spectral": spectral_summary(logs, cfg.crma.rho) if cfg.condition == "modular" else None,
        "config": cfg.to_dict(), "command": command, "version": __version__,
    })
    res["tokens_per_s"] = res["train_tokens"] / res["train_seconds"] if res["train_seconds"] else 0.0
    return res


def continual_run(cfg: RunConfig, command: str | None = None, progress: bool = True,
                  router_cfg: RouterConfig | None = None) -> dict:
    """Run every phase of `cfg`; returns (and writes) the results. The router (DIR/router) is
    updated from each domain's own data as its phase ends (`router_cfg`, defaults when None)."""
    command = command or command_line()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", cfg.to_dict())
    set_seed(cfg.seed)
    accelerator = Accelerator()
    model, tokenizer = load_model(cfg.model, seed=cfg.seed)
    model.to(accelerator.device)
    pad_id = tokenizer.pad_token_id
    data = load_domains(cfg, tokenizer)
    names = [d.name for d in data]
    ebs = cfg.train.eval_batch_size

    def evaluate_all(adapter_for) -> list:
        """Per-passage losses of every domain, domain j evaluated with adapter adapter_for(j)."""
        return [_eval_with(model, adapter_for(j), d, ebs, pad_id, progress) for j, d in enumerate(data)]

    base = evaluate_all(lambda j: None)                        # untouched base model
    # ---- router (issue 4): built on the untouched base model's features, see crma/routing/router.py
    router_cfg = router_cfg or RouterConfig()
    router = Router(router_cfg, meta={"model": cfg.model, "fingerprint": fingerprint(model),
                                      "layer": resolve_layer(model, router_cfg.layer), "condition": cfg.condition})
    backbone = None
    if cfg.condition == "modular":
        backbone = CRMABackbone.for_model(model, cfg.crma, seed=cfg.seed).attach(model)
    matrix, logs = [], []
    for i, dom in enumerate(data):
        adapter = SHARED if cfg.condition == "naive" else dom.name
        if i == 0 or cfg.condition != "naive":
            torch.manual_seed(cfg.seed * 1000 + i)     # same LoRA init for every condition
            model = add_adapter(model, adapter, cfg.lora)
        lora_params = set_trainable(model, adapter, backbone=backbone is not None)
        with active(model, adapter):
            log = train_phase(model, dom.train, cfg.train, seed=cfg.seed * 1000 + i, domain=dom.name,
                              adapter=adapter, lora_params=lora_params, backbone=backbone,
                              accelerator=accelerator, pad_id=pad_id)
        logs.append(log)
        set_trainable(model, None, backbone=False)
        save_adapter(model, adapter, out / "adapters")
        # ---- router (issue 4): add this domain from its own train passages, calibrate on its holdout
        started = time.perf_counter()
        router.add_domain(dom.name, domain_features(model, tokenizer, dom.train_texts, router_cfg,
                                                    router_cfg.max_passages),
                          domain_features(model, tokenizer, dom.holdout_texts, router_cfg, router_cfg.max_calib),
                          adapter=adapter)
        router.calibration[dom.name]["build_seconds"] = round(time.perf_counter() - started, 3)
        router.save(out)
        if backbone is not None:
            backbone.save(out)
        if cfg.condition == "naive":
            matrix.append(evaluate_all(lambda j: SHARED))
        else:
            matrix.append(evaluate_all(lambda j, i=i: names[j] if j <= i else None))
        finished = i == len(data) - 1
        results = build_results(cfg, command, base, matrix, logs, names, finished)
        write_json(out / "results.json", results)
    if backbone is not None:
        (out / "spectral_log.jsonl").write_text(
            "".join(json.dumps({"phase": p, "step": s, "layers": layers}) + "\n"
                    for p, log in enumerate(logs) for s, layers in enumerate(log.spectral)))
    if progress:
        print(format_table(results))
    return results


def _eval_with(model, adapter, dom: DomainData, ebs: int, pad_id: int, progress: bool):
    with active(model, adapter):
        return passage_losses(model, dom.holdout, ebs, pad_id, desc=f"eval {dom.name}", progress=progress)


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
        drift = res["per_domain_drift_pct"] + [float("nan")]
        lines.append("drift %".ljust(14) + "".join(f"{v:{w}.2f}" for v in drift))
        lines.append("gain %".ljust(14) + "".join(f"{v:{w}.2f}" for v in res["gain_pct"]))
        if res["drift_pct"] is not None:
            lines.append(f"drift (mean over prior domains): {res['drift_pct']:+.2f}%")
        if res.get("spectral"):
            s = res["spectral"]
            lines.append(f"spectral: max | ||M||_2 - 1 | = {s['max_norm_dev']:.2e}, max sum dev = "
                         f"{s['max_sum_dev']:.2e}, certificate {'held' if s['certificate_ok'] else 'FAILED'} "
                         f"over {s['steps']} steps x {s['layers']} layers")
    lines.append(f"train: {res['train_tokens']} tokens in {res['train_seconds']:.1f}s "
                 f"({res['tokens_per_s']:.1f} tokens/s)")
    return "\n".join(lines)
