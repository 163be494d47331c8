"""Load a finished `crma run` directory for inference: base model, CRMA backbone, adapters, router.

    run = load_run("runs/x")
    decision = run.route(["What are the symptoms of ...?"])[0]     # Decision(domain, confidence, ...)
    with run.using(decision.domain): model(...)                       # the routed adapter (or base)
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .method.adapters import active, load_adapter
from .routing.features import hidden_features, resolve_layer
from .method.models import fingerprint, load_model
from .routing.router import BASE, Decision, Router, RouterError


@dataclass
class LoadedRun:
    run_dir: Path
    model: nn.Module
    tokenizer: object
    router: Router | None
    info: dict                                   # model, condition, seed, domains, train settings
    adapters: list[str] = field(default_factory=list)

    def features(self, texts: list[str], batch_size: int = 16):
        """Router features of `texts` (base model, adapters off, CRMA bypassed): pooled (n, dim) + chars/token."""
        cfg = self.router.cfg
        return hidden_features(self.model, self.tokenizer, texts, cfg.layer, cfg.max_tokens, batch_size)

    def route(self, texts: list[str], batch_size: int = 16) -> list[Decision]:
        """One routing Decision per text."""
        if self.router is None:
            raise FileNotFoundError(f"{self.run_dir / 'router'}: this run has no router")
        return self.router.route_batch(self.features(texts, batch_size))

    def adapter_for(self, domain: str) -> str | None:
        """The adapter serving a routed domain (None = base model without a domain adapter)."""
        return self.router.adapter_for(domain) if self.router is not None else (None if domain == BASE else domain)

    @contextmanager
    def using(self, domain: str):
        """Context: the model runs with the adapter of `domain` ('base': no adapter, CRMA kept on)."""
        with active(self.model, self.adapter_for(domain)):
            yield self.model


def run_info(run_dir: str | Path) -> dict:
    """Model spec, condition, seed, domain names and train settings of a run, from DIR/results.json
    (written after every phase) or, before the first phase ends, DIR/config.json."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    config_path, results_path = run_dir / "config.json", run_dir / "results.json"
    if results_path.exists():
        res = json.loads(results_path.read_text(encoding="utf-8"))
        cfg = res.get("config", {})
        return {"model": res["model"], "condition": res["condition"], "seed": res.get("seed", 0),
                "domains": res["domains"], "train": cfg.get("train", {}), "finished": res.get("finished")}
    if config_path.exists():
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
        return {"model": cfg["model"], "condition": cfg["condition"], "seed": cfg.get("seed", 0),
                "domains": [d["name"] for d in cfg["domains"]], "train": cfg.get("train", {}),
                "finished": False}
    raise FileNotFoundError(f"{run_dir}: not a crma run directory (no results.json or config.json)")


def load_run(run_dir: str | Path, adapters: bool = True, router: bool = True) -> LoadedRun:
    """Rebuild what a run produced: base model (+ CRMA backbone if saved) + every saved adapter + router."""
    run_dir = Path(run_dir)
    info = run_info(run_dir)
    rt = None
    if router:
        rt = Router.load(run_dir)            # FileNotFoundError naming the path when missing
    model, tokenizer = load_model(info["model"], seed=int(info["seed"]))
    if rt is not None:
        check_router_model(rt, model, run_dir)
    backbone_file = run_dir / "crma_backbone.safetensors"
    if backbone_file.exists():
        from .method.backbone import CRMABackbone
        CRMABackbone.load(run_dir, model).attach(model)
    names = []
    adapter_root = run_dir / "adapters"
    if adapters and adapter_root.is_dir():
        for folder in sorted(p for p in adapter_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            model = load_adapter(model, folder.name, folder)
            names.append(folder.name)
        model.eval()
    if rt is not None:
        missing = sorted({a for a in rt.adapters.values() if a not in names}) if adapters else []
        if missing:
            raise FileNotFoundError(f"{adapter_root}: router maps to adapter(s) {missing} that are not saved there")
    return LoadedRun(run_dir, model, tokenizer, rt, info, names)


def check_router_model(router: Router, model: nn.Module, where: Path) -> None:
    """The router's statistics are only valid for the base model and layer they were built with."""
    saved = router.meta.get("fingerprint")
    if saved is not None and saved != fingerprint(model):
        raise RouterError(f"{where / 'router'}: router was built on a different base model "
                         f"(saved fingerprint {saved}, this model {fingerprint(model)})")
    layer = router.meta.get("layer")
    if layer is not None and resolve_layer(model, router.cfg.layer) != layer:
        raise RouterError(f"{where / 'router'}: router layer {layer} does not match this model")
