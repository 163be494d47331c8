"""Continual-learning baselines measured beside CRMA, on the same data, order, seeds and LoRA settings.

    ewc     one shared LoRA + a diagonal-Fisher penalty per earlier phase   (ewc.py,    Kirkpatrick et al. 2017)
    replay  one shared LoRA + a reservoir of earlier passages mixed in      (replay.py, Chaudhry et al. 2019)
    olora   a LoRA per task, orthogonal to earlier ones, all summed         (olora.py,  Wang et al. 2023)

A run makes one `Method` object (`make_method`) that holds the state living across phases; the run's
phases call its hooks: `training` (which adapters are active while training), `begin_phase`,
`phase_examples` (the phase's ordered training passages), `penalty` (added to the LM loss at every step),
`after_phase` (Fisher, reservoir, frozen A), `serving` (the model evaluated after a phase, when it is not one
adapter per domain) and `storage()` (what the method must keep beyond its adapters). The core conditions
(naive, frozen, modular) get a plain `Method`, whose hooks only train the phase's adapter.
"""
from __future__ import annotations

from ..config import CLConfig
from .base import Baseline, Method, summed_adapters
from .ewc import EWC
from .olora import OLoRA
from .replay import Replay

BASELINE_METHODS = {"ewc": EWC, "replay": Replay, "olora": OLoRA}


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


def make_method(condition: str, cl: CLConfig | None = None, seed: int = 0, n_phases: int = 1) -> Method:
    """The method of a run or an add: a baseline's (holding its state across the run's phases) or, for naive,
    frozen and modular, the plain Method."""
    cls = BASELINE_METHODS.get(condition)
    cl = cl or CLConfig()
    return cls(cl, seed, n_phases) if cls is not None else Method(cl, seed, n_phases, name=condition)


__all__ = ["BASELINE_METHODS", "Baseline", "Method", "describe_storage", "fmt_bytes", "make_method",
           "summed_adapters"]
