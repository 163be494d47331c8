"""One training phase (one domain) on Hugging Face Accelerate, with gradient and spectral logging."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from .. import runtime
from ..baselines import Method
from ..config import TrainConfig
from ..data import Example, collate, epoch_order
from ..method.backbone import CRMABackbone


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


def token_loss_sum(model, rows: list[Example], pad_id: int, device) -> torch.Tensor:
    """Sum over the rows' predicted tokens of -log p(x_t | x_<t) (fp32 logits), a scalar tensor."""
    batch = {k: v.to(device) for k, v in collate(rows, pad_id).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits   # (b, s, V)
    targets = batch["labels"][:, 1:]                                                               # (b, s-1)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                           reduction="sum")


def train_phase(model, examples: list[Example], cfg: TrainConfig, *, seed: int, domain: str,
                adapter: str, lora_params: list, backbone: CRMABackbone | None,
                accelerator: Accelerator, pad_id: int, method: Method) -> PhaseLog:
    """Train the current adapter (and backbone, if given) on one domain's token lists. A baseline's
    `method` (crma/baselines) may order/mix the phase's passages and add a penalty to every step's loss;
    log.losses stays the LM loss alone (comparable across conditions), the penalty goes to log.penalties.

    cfg.batch_size is the GLOBAL batch: under N processes each takes a contiguous share of every batch
    (runtime.shard) in micro-batches of cfg.micro_batch_size rows, and every step minimises

        loss = sum over all predicted tokens of the global batch of CE / number of those tokens,

    exactly as one process does. Under DDP each process backpropagates N * (its tokens' CE sum) / global
    tokens and DDP averages (earlier micro-batches accumulate without syncing); with a sharded base
    (--fsdp) each backpropagates its CE sum / global tokens and the replicated adapter and backbone
    gradients are summed (runtime.all_reduce_grads). Every process runs as many micro-batches as the
    largest share needs (a missing one is a forward of weight 0), so collectives stay in step."""
    log = PhaseLog(domain=domain, adapter=adapter)
    ordered = method.phase_examples(examples, cfg, seed)
    if ordered is None:
        order = epoch_order(len(examples), cfg.epochs, seed)
        ordered = [examples[i] for i in order]
    batches = [ordered[i:i + cfg.batch_size] for i in range(0, len(ordered), cfg.batch_size)]
    optimizer = make_optimizer(lora_params, backbone, cfg)
    sharded = runtime.base_sharded()
    if sharded:                                  # the base is already sharded; adapters/backbone replicated
        wrapped = model
    else:
        wrapped, optimizer = accelerator.prepare(model, optimizer)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    procs = accelerator.num_processes
    ce_scale, penalty_scale = (1.0, 1.0 / procs) if sharded else (float(procs), 1.0)   # sum vs DDP's mean
    if backbone is not None:
        log.spectral.append(backbone.stats())          # step 0: the matrices before any update
    wrapped.train()
    start = time.perf_counter()
    bar = tqdm(batches, desc=f"train {domain}", leave=False, disable=not accelerator.is_main_process)
    for batch in bar:
        n_tokens = sum(x.predicted for x in batch)                         # predicted tokens, all processes
        share = [batch[i] for i in runtime.shard(len(batch))]
        micro = cfg.micro_batch_size or runtime.largest_share(len(batch))
        n_chunks = -(-runtime.largest_share(len(batch)) // micro)           # the same on every process
        chunks = [share[i * micro:(i + 1) * micro] for i in range(n_chunks)]
        local = 0.0
        extra = method.penalty()
        if extra is not None:
            log.penalties.append(float(extra.detach()))
        for k, rows in enumerate(chunks):
            last = k == len(chunks) - 1
            with nullcontext() if last or sharded else accelerator.no_sync(wrapped):
                ce = token_loss_sum(wrapped, rows or batch[:1], pad_id, accelerator.device) * (1.0 if rows else 0.0)
                loss = ce * (ce_scale / n_tokens)
                if k == 0 and extra is not None:
                    loss = loss + extra * penalty_scale
                accelerator.backward(loss)
            local += float(ce.detach())
        if sharded:
            runtime.all_reduce_grads(trainable)
        grad_norm = accelerator.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.losses.append(runtime.all_sum(local) / n_tokens)
        log.grad_norms.append(float(grad_norm))
        log.tokens += sum(len(x) for x in batch)
        if backbone is not None:
            log.spectral.append(backbone.stats())
        bar.set_postfix(loss=f"{log.losses[-1]:.3f}", gnorm=f"{log.grad_norms[-1]:.2f}")
    log.seconds = time.perf_counter() - start
    model.eval()
    accelerator.free_memory()
    return log
