"""The hooks of a run's method (see the package docstring): `Method`, what the core conditions use (the phase's
adapter alone, nothing added), and `Baseline`, its base for ewc, replay and olora; PEFT's multi-adapter forward."""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from ..config import SHARED_ADAPTER_CONDITIONS, CLConfig, TrainConfig
from ..data import Example
from ..method.adapters import active


@contextmanager
def summed_adapters(model, names: list[str]):
    """Context: every adapter in `names` active at once, so each LoRA layer outputs
    base(x) + sum_k scale_k B_k A_k x (PEFT's multi-adapter forward); none: the base model.
    Gradients are off for all of them (set_trainable turns on the one that trains)."""
    if not names:
        with model.disable_adapter():
            yield model
        return
    previous = model.active_adapter              # PeftModel keeps one name; its LoraModel gets the list
    model.base_model.set_adapter(list(names), inference_mode=True)
    try:
        yield model
    finally:
        model.set_adapter(previous, inference_mode=True)


def adapter_param_count(params) -> int:
    return sum(p.numel() for p in params)


class Method:
    """The hooks a phase calls. This class is the core conditions' method (naive, frozen, modular): the phase's
    adapter trains alone on the phase's own passages, nothing is added to the loss, nothing is kept."""

    name = ""
    summed = False           # evaluated with every trained adapter summed (no router): olora

    def __init__(self, cl: CLConfig, seed: int, n_phases: int, name: str | None = None):
        self.name = name or type(self).name
        self.cl, self.seed, self.n_phases = cl, seed, n_phases
        self.phase = 0                       # phases finished
        self.extra_seconds: list[float] = []  # per phase, time of after_phase (Fisher, reservoir): not training
        self.adapter_params = 0              # parameters of one LoRA adapter

    def training(self, live, adapter: str):
        """Context for the phase: which adapters the forward pass uses while `adapter` trains."""
        return active(live.model, adapter)

    def serving(self, live, adapter: str):
        """Context: the model a domain trained on `adapter` is evaluated with (when `summed`: every domain's)."""
        return active(live.model, adapter)

    def begin_phase(self, live, adapter: str, lora_params: list) -> None:
        self.adapter_params = adapter_param_count(lora_params)

    def phase_examples(self, examples: list[Example], cfg: TrainConfig, seed: int) -> list[Example] | None:
        return None                          # None: train_phase's own seeded order (crma.data.epoch_order)

    def penalty(self) -> torch.Tensor | None:
        """A scalar added to every step's LM loss (None: nothing)."""
        return None

    def update(self, live, dom, adapter: str, settings, last: bool) -> None:
        """After the phase's last step: the method's own state (`last`: no later phase in this run)."""

    def after_phase(self, live, dom, adapter: str, settings) -> None:
        """Timed separately from training: the method's own extra cost."""
        start = time.perf_counter()
        self.update(live, dom, adapter, settings, last=self.phase == self.n_phases - 1)
        self.extra_seconds.append(time.perf_counter() - start)
        self.phase += 1

    def storage(self) -> dict | None:
        """What the method keeps beyond its adapters (None: nothing; results.json `storage`)."""
        return None


class Baseline(Method):
    """A continual-learning baseline: like Method, and it reports what it stores."""

    def storage(self) -> dict:
        """What the method keeps: its adapters plus whatever it adds (bytes as fp32)."""
        shared = self.name in SHARED_ADAPTER_CONDITIONS
        adapters = 1 if shared else self.phase
        return {"method": self.name, "settings": self.cl.for_condition(self.name),
                "adapter_params": self.adapter_params, "adapter_bytes": 4 * self.adapter_params,
                "adapters": adapters, "adapters_bytes": 4 * self.adapter_params * adapters,
                "extra_seconds": sum(self.extra_seconds), "extra_seconds_per_phase": list(self.extra_seconds)}
