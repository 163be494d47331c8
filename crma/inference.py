"""A store (or a `crma run` folder, which is a store) loaded for routing and inference.

    run = load_run("runs/x")
    decision = run.route(["What are the symptoms of ...?"])[0]     # Decision(domain, confidence, ...)
    with run.using(decision.domain): model(...)                       # that domain's adapter (pinned) or base

A thin view over crma.store: the model is the store's LiveModel, the router its current version.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .routing import BASE, Decision, Router, check_encoder, route_texts
from .store import Store
from .store.add import load_router
from .store.live import LiveModel


@dataclass
class LoadedRun:
    run_dir: Path
    live: LiveModel
    router: Router | None
    info: dict                                   # model, condition, seed, domains, train settings
    adapters: list[str] = field(default_factory=list)
    backbone: str = "pinned"

    @property
    def model(self) -> nn.Module:
        return self.live.model

    @property
    def tokenizer(self):
        return self.live.tokenizer

    def route(self, texts: list[str]) -> list[Decision]:
        """One routing Decision per text (the router's own features: crma.routing.route_texts)."""
        if self.router is None:
            raise FileNotFoundError(f"{self.run_dir}: this store has no router (no domain added yet)")
        return route_texts(self.router, self.model, self.tokenizer, texts)

    def adapter_for(self, domain: str) -> str | None:
        """The adapter serving a routed domain (None = base model without a domain adapter)."""
        return None if domain == BASE else self.live.store.adapter_name(domain)

    @contextmanager
    def using(self, domain: str):
        """Context: the model runs with `domain`'s adapter on its backbone version ('base': no adapter)."""
        with self.live.using(None if domain == BASE else domain, self.backbone) as model:
            yield model


def run_info(store: Store) -> dict:
    """Model spec, condition, seed, domains and the newest adapter's train settings of a store."""
    domains = store.domains()
    train = store.adapter_meta(domains[-1])["train"] if domains else {}
    return {"model": store.model_spec, "condition": store.condition, "seed": store.manifest["settings"].get("seed", 0),
            "domains": domains, "train": train}


def load_run(run_dir: str | Path, adapters: bool = True, router: bool = True, backbone: str = "pinned",
             device=None) -> LoadedRun:
    """Open a store: base model (+ backbone), every current adapter when `adapters`, the router."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such store or run directory")
    store = Store(run_dir)
    rt = load_router(store) if router else None
    if router and rt is None:
        raise FileNotFoundError(f"{run_dir}: the store has no router yet (no domain added)")
    live = LiveModel.open(store, device=device)   # device: a DeviceConfig (default automatic)
    if rt is not None:
        check_encoder(rt, live.model)     # built on this base model, with the features this process computes
    names = []
    if adapters:
        for d in store.domains():
            name = store.adapter_name(d)
            live.ensure_adapter(name, store.adapter_meta(d)["version"])
            names.append(name)
    return LoadedRun(run_dir, live, rt, run_info(store), sorted(set(names)), backbone)
