"""Holdout loss: token-weighted mean cross-entropy, kept per passage so probes can be computed."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import runtime
from ..data import Example, collate


@torch.no_grad()
def passage_losses(model, examples: list[Example], batch_size: int, pad_id: int,
                   desc: str = "eval", progress: bool = True) -> list[tuple[float, int]]:
    """(sum of next-token cross-entropy, number of predicted tokens) for each passage, in order.

        loss_sum_p = sum_{t=1}^{len_p - 1} -log p(x_t | x_<t)

    Under N processes each evaluates a contiguous shard of the passages and the per-passage pairs are
    gathered back in order (every process must call this), so token-weighted means are as on one."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = len(examples)
    examples = [examples[i] for i in runtime.shard(total)]
    steps = -(-(runtime.largest_share(total) if runtime.base_sharded() else len(examples)) // batch_size)
    out: list[tuple[float, int]] = []
    progress = progress and runtime.is_main()
    for start in tqdm(range(0, steps * batch_size, batch_size), desc=desc, leave=False, disable=not progress):
        if start >= len(examples):           # sharded base: a forward in step with the others, discarded
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device))
            continue
        batch = collate(examples[start : start + batch_size], pad_id)
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()       # (b, s, vocab)
        targets = batch["labels"][:, 1:].to(device)                               # (b, s-1)
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets,
                             ignore_index=-100, reduction="none")                 # (b, s-1)
        valid = targets != -100
        for row in range(ids.shape[0]):
            out.append((float(ce[row][valid[row]].sum()), int(valid[row].sum())))
    model.train(was_training)
    return runtime.gather(out)


def mean_loss(losses: list[tuple[float, int]]) -> float:
    """Token-weighted mean: sum of all token losses / number of tokens."""
    return sum(s for s, _ in losses) / max(1, sum(n for _, n in losses))
