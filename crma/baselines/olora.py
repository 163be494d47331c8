"""O-LoRA: a new LoRA per task, trained orthogonal to the earlier tasks' frozen LoRA subspaces.

Wang, Chen, Ge, et al., "Orthogonal Subspace Learning for Language Model Continual Learning", Findings
of EMNLP 2023 (arXiv 2310.14152). In PEFT's shapes a LoRA layer adds scale * B A x, A: (r, in), B: (out, r);
the rows of A span the input subspace the update reads. Task t trains a fresh (A_t, B_t) on top of the
frozen earlier ones (base + sum_{i<t} dW_i + dW_t in the forward pass), with

    L = L_t + lambda_1 sum_layers sum_{i<t} || A_i A_t^T ||_F^2  +  lambda_2 || theta_t ||_2^2

(A_i A_t^T: r x r). At inference every task's LoRA is summed, base + sum_i scale B_i A_i, with no router
and no task id: the comparison with CRMA's routed per-domain adapters. Defaults lambda_1 = 0.5,
lambda_2 = 0 are the authors' scripts'; their code uses sum |A_i A_t^T| (L1) and an unsquared ||theta||,
where this module follows the paper's squared norms, so the same lambda_1 weighs differently.

Stores every task's adapter (like frozen) and nothing else: the frozen A_i are part of those adapters.
Phase 0 with lambda_2 = 0 has no penalty and no earlier adapter: it is frozen's phase 0, to the bit.
"""
from __future__ import annotations

import torch

from .base import Baseline, summed_adapters


def orthogonality(previous: torch.Tensor, a_new: torch.Tensor) -> torch.Tensor:
    """sum_i ||A_i A_t^T||_F^2 with previous = [A_1; ...; A_{t-1}] stacked: (k r, in); a_new: (r, in)."""
    return (previous @ a_new.transpose(0, 1)).pow(2).sum()              # (k r, r) -> scalar


def lora_layers(model):
    """Every PEFT LoRA layer (modules with a lora_A dict)."""
    return [m for m in model.modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict)]


class OLoRA(Baseline):
    name = "olora"
    summed = True

    def __init__(self, cl, seed, n_phases):
        super().__init__(cl, seed, n_phases)
        self.trained: list[str] = []                       # earlier tasks' adapters, frozen, in order
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []   # per layer: (A_t param, earlier A's stacked)
        self.new: list[torch.nn.Parameter] = []
        self.start, self.overlaps = 0.0, []

    def training(self, live, adapter):
        return summed_adapters(live.model, [*self.trained, adapter])

    def serving(self, live, adapter=None):
        return summed_adapters(live.model, self.trained)

    def begin_phase(self, live, adapter, lora_params):
        super().begin_phase(live, adapter, lora_params)
        self.new = list(lora_params)
        self.pairs = [(m.lora_A[adapter].weight,
                       torch.cat([m.lora_A[n].weight.detach() for n in self.trained], 0))       # (k r, in)
                      for m in lora_layers(live.model) if adapter in m.lora_A] if self.trained else []
        self.start = self._overlap()

    def penalty(self):
        terms = []
        if self.pairs and self.cl.olora_lambda1:
            terms.append(self.cl.olora_lambda1 * sum(orthogonality(prev, a) for a, prev in self.pairs))
        if self.cl.olora_lambda2:
            terms.append(self.cl.olora_lambda2 * sum(p.pow(2).sum() for p in self.new))
        return sum(terms) if terms else None

    @torch.no_grad()
    def _overlap(self) -> float:
        return float(sum(orthogonality(prev, a) for a, prev in self.pairs))

    def update(self, live, dom, adapter, settings, last):
        if self.pairs:
            self.overlaps.append([self.start, self._overlap()])
        self.trained.append(adapter)

    def storage(self):
        return {**super().storage(), "extra_bytes": 0, "inference": "all adapters summed, no router",
                "adapters_summed": list(self.trained),
                # per task t > 0: sum over layers of sum_{i<t} ||A_i A_t^T||_F^2 at the phase's start and end
                "orthogonality_start_end": self.overlaps}
