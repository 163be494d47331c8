"""Continual-learning baselines measured beside CRMA, on the same data, order, seeds and LoRA settings.

    ewc     one shared LoRA + a diagonal-Fisher penalty per earlier phase   (ewc.py,    Kirkpatrick et al. 2017)
    replay  one shared LoRA + a reservoir of earlier passages mixed in      (replay.py, Chaudhry et al. 2019)
    olora   a LoRA per task, orthogonal to earlier ones, all summed         (olora.py,  Wang et al. 2023)

A run makes one `Method` object (`make_method`) that holds the state living across phases; the run's
phases call its hooks: `training` (which adapters are active while training), `begin_phase`,
`phase_examples` (the phase's ordered training passages), `penalty` (added to the LM loss at every step),
`after_phase` (Fisher, reservoir, frozen A), `serving` (the model evaluated after a phase, when it is not one
adapter per domain) and `storage()` (what the method must keep beyond its adapters). The core conditions
(naive, frozen, modular) make no Method, and their code path is unchanged.
"""
from __future__ import annotations

from dataclasses import asdict

from ..config import BASELINES, SHARED_ADAPTER_CONDITIONS, RunConfig


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def describe_storage(s: dict) -> str:
    """One line: what a baseline run keeps (results.json `storage`), for the run table and the report."""
    one = f"{s['adapter_params']:,} params, {fmt_bytes(s['adapter_bytes'])} fp32"
    if s["method"] == "ewc":
        return (f"1 shared LoRA ({one}) + a Fisher ({s['fisher_estimate']}) and an anchor per phase: "
                f"{s['bytes_per_phase']:,} bytes ({fmt_bytes(s['bytes_per_phase'])}) x {s['phases_stored']} = "
                f"{fmt_bytes(s['extra_bytes'])}")
    if s["method"] == "replay":
        per = ", ".join(f"{d} {n}" for d, n in s["passages_per_domain"].items())
        return (f"1 shared LoRA ({one}) + {s['passages_kept_as_text']} training passages kept as text "
                f"({fmt_bytes(s['text_bytes'])}; {per}) of {s['passages_seen']} seen")
    return f"{s['adapters']} LoRA adapters ({one} each), all summed at inference; no data, no Fisher"


def make_method(cfg: RunConfig):
    """The run's Method (crma.baselines.base) for a baseline condition; None for naive, frozen and modular."""
    if cfg.condition not in BASELINES:
        return None
    from .ewc import EWC
    from .olora import OLoRA
    from .replay import Replay
    cls = {"ewc": EWC, "replay": Replay, "olora": OLoRA}[cfg.condition]
    return cls(cfg.cl, cfg.seed, len(cfg.domains))


def store_create(cfg: RunConfig, fingerprint: dict, settings, router_cfg) -> dict:
    """`create` of a baseline run's store: as naive's (shared adapter) or frozen's (one per domain), under
    its own condition name and with its settings recorded. `crma add` refuses such a store (train_domain)."""
    from ..store.add import store_settings
    like = "naive" if cfg.condition in SHARED_ADAPTER_CONDITIONS else "frozen"
    create = store_settings(like, cfg.model, fingerprint, settings, router_cfg)
    create["condition"] = cfg.condition
    create["settings"]["cl"] = asdict(cfg.cl)
    return create
