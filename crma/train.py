"""One training phase (one domain) on Hugging Face Accelerate, with gradient and spectral logging."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .method.backbone import CRMABackbone
from .config import TrainConfig
from .data import collate, epoch_order



@dataclass
class PhaseLog:
    """What one phase did: per-step loss and gradient norm, throughput, and the spectral log."""

    domain: str
    adapter: str
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)   # total norm before clipping
    tokens: int = 0
    seconds: float = 0.0
    spectral: list[list[dict]] = field(default_factory=list)  # [step][layer] -> stats
    penalties: list[float] = field(default_factory=list)     # a baseline's extra loss term per step (ewc, olora)

    def summary(self) -> dict:
        g = self.grad_norms or [0.0]
        extra = {"penalty_first": self.penalties[0], "penalty_last": self.penalties[-1],
                 "penalty_steps": len(self.penalties)} if self.penalties else {}
        return {"domain": self.domain, "adapter": self.adapter, "steps": len(self.losses),
                "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens / self.seconds, 2) if self.seconds else 0.0,
                "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None,
                "grad_norm_peak": max(g), "grad_norm_mean": sum(g) / len(g), **extra}


def make_optimizer(lora_params: list, backbone: CRMABackbone | None, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW: LoRA weights at cfg.lr; backbone groups (Theta, gate, read/write) at their own rates."""
    groups = [{"params": lora_params, "lr": cfg.lr, "name": "lora"}]
    if backbone is not None:
        groups += backbone.param_groups()
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)


def train_phase(model, examples: list[list[int]], cfg: TrainConfig, *, seed: int, domain: str,
                adapter: str, lora_params: list, backbone: CRMABackbone | None,
                accelerator: Accelerator, pad_id: int, method=None) -> PhaseLog:
    """Train the current adapter (and backbone, if given) on one domain's token lists. A baseline's
    `method` (crma/baselines) may order/mix the phase's passages and add a penalty to every step's loss;
    log.losses stays the LM loss alone (comparable across conditions), the penalty goes to log.penalties."""
    log = PhaseLog(domain=domain, adapter=adapter)
    ordered = method.phase_examples(examples, cfg, seed) if method is not None else None
    if ordered is None:
        order = epoch_order(len(examples), cfg.epochs, seed)
        ordered = [examples[i] for i in order]
    loader = DataLoader(ordered, batch_size=cfg.batch_size, shuffle=False,
                        collate_fn=lambda b: collate(b, pad_id))
    optimizer = make_optimizer(lora_params, backbone, cfg)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    if backbone is not None:
        log.spectral.append(backbone.stats())          # step 0: the matrices before any update
    model.train()
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"train {domain}", leave=False, disable=not accelerator.is_local_main_process)
    for batch in bar:
        loss = model(**batch).loss
        extra = method.penalty() if method is not None else None
        if extra is not None:
            log.penalties.append(float(extra.detach()))
        accelerator.backward(loss if extra is None else loss + extra)
        grad_norm = accelerator.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.losses.append(float(loss.detach()))
        log.grad_norms.append(float(grad_norm))
        log.tokens += int(batch["attention_mask"].sum())
        if backbone is not None:
            log.spectral.append(backbone.stats())
        bar.set_postfix(loss=f"{log.losses[-1]:.3f}", gnorm=f"{log.grad_norms[-1]:.2f}")
    log.seconds = time.perf_counter() - start
    model.eval()
    accelerator.free_memory()
    return log
