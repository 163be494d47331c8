"""Elastic Weight Consolidation on one shared LoRA adapter.

Kirkpatrick, Pascanu, Rabinowitz, et al., "Overcoming catastrophic forgetting in neural networks",
PNAS 114(13), 2017 (arXiv 1612.00796). The LoRA weights theta (A and B of every targeted layer) are the
parameters; the base model is frozen. After phase i, with theta*_i the adapter as phase i left it:

    F_i = 1/N sum_{p=1..N} (d/dtheta  l_p(theta*_i))^2          diagonal Fisher, one entry per LoRA weight
    l_p = -1/n_p sum_t log p(y_t | x_<t)                          passage p's mean-token loss (batch of one)

and every later phase t trains on

    L(theta) = L_t(theta) + sum_{i<t} (lambda / 2) sum_k F_i,k (theta_k - theta*_i,k)^2

`ewc_fisher` picks the targets y_t: "empirical" uses the passage's gold tokens (what LLM EWC code does,
e.g. TRACE); "sampled" draws y_t ~ p(. | x_<t) from the model once per position (a Monte Carlo estimate
of the true Fisher, the quantity of the paper; Kunstner et al. 2019 on why the two differ). A weight the
loss does not reach (no gradient, e.g. A while B = 0) gets F = 0, so it is free to move.

Stores per phase one Fisher and one anchor, each the adapter's size in fp32: 8 x (LoRA parameters)
bytes per phase (storage()). The last phase's Fisher is not computed: nothing in the run uses it; a
deployment awaiting another domain would keep one more.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import Example, collate
from ..method.adapters import adapter_of
from .base import Baseline


def diagonal_fisher(model, examples: list[Example], params: dict[str, torch.Tensor], estimate: str = "empirical",
                    seed: int = 0, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """F[name] (the parameter's shape): mean over passages of the squared gradient of the passage's
    mean-token loss, on gold ("empirical") or model-sampled ("sampled") next tokens. Zero where no gradient."""
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    if not examples:
        return fisher
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    device = next(iter(params.values())).device
    names, tensors = list(params), list(params.values())
    for ids in examples:
        batch = collate([ids], pad_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits[0, :-1].float()   # (s-1, vocab)
        if estimate == "sampled":
            with torch.no_grad():
                targets = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=gen)[:, 0].to(device)  # (s-1,)
        else:
            targets = batch["input_ids"][0, 1:].to(device)                                              # (s-1,)
        targets = targets.masked_fill(batch["labels"][0, 1:].to(device) == -100, -100)   # the trained tokens only
        loss = F.cross_entropy(logits, targets, ignore_index=-100)    # mean over the passage's trained tokens
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        for name, g in zip(names, grads, strict=False):
            if g is not None:
                fisher[name] += g.detach().float() ** 2
    model.train(was_training)
    return {n: f / len(examples) for n, f in fisher.items()}


def ewc_penalty(params: dict[str, torch.Tensor], fishers: list[dict], anchors: list[dict], lam: float) -> torch.Tensor:
    """sum_i (lam / 2) sum_k F_i,k (theta_k - theta*_i,k)^2 over the stored phases i."""
    total = sum((f[n] * (p - a[n]) ** 2).sum()
                for f, a in zip(fishers, anchors, strict=False) for n, p in params.items())
    return 0.5 * lam * total


class EWC(Baseline):
    name = "ewc"

    def __init__(self, cl, seed, n_phases):
        super().__init__(cl, seed, n_phases)
        self.fishers: list[dict[str, torch.Tensor]] = []     # F_i per finished phase: name -> (param shape)
        self.anchors: list[dict[str, torch.Tensor]] = []     # theta*_i, same shapes
        self.params: dict[str, torch.nn.Parameter] = {}

    def begin_phase(self, live, adapter, lora_params):
        super().begin_phase(live, adapter, lora_params)
        self.params = {n: p for n, p in live.model.named_parameters() if adapter_of(n) == adapter}

    def penalty(self):
        if not self.fishers or self.cl.ewc_lambda == 0:
            return None
        return ewc_penalty(self.params, self.fishers, self.anchors, self.cl.ewc_lambda)

    def update(self, live, dom, adapter, settings, last):
        if last:
            return
        n = self.cl.ewc_fisher_passages
        examples = dom.train[:n] if n else dom.train
        self.fishers.append(diagonal_fisher(live.model, examples, self.params, self.cl.ewc_fisher,
                                            seed=self.seed * 1000 + self.phase, pad_id=live.tokenizer.pad_token_id))
        self.anchors.append({k: p.detach().clone() for k, p in self.params.items()})

    def storage(self):
        per_phase = sum(8 * p.numel() for p in self.params.values())     # fp32 Fisher + fp32 anchor
        return {**super().storage(), "fisher_estimate": self.cl.ewc_fisher,
                "fisher_passages": self.cl.ewc_fisher_passages or "all",
                "phases_stored": len(self.fishers), "bytes_per_phase": per_phase,
                "extra_bytes": per_phase * len(self.fishers), "fisher_nonzero_fraction": self._nonzero()}

    def _nonzero(self) -> list[float]:
        """Per stored phase: the fraction of LoRA weights with F > 0 (the rest are free to move)."""
        return [float(sum((f > 0).sum() for f in fi.values()) / max(1, sum(f.numel() for f in fi.values())))
                for fi in self.fishers]
