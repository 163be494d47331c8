"""Router features of the `base` encoder: the BASE model's own hidden state at one layer, mean-pooled over the
tokens (the default encoder, MiniLM, is in crma/routing/encoders.py); and cutting passages into segments.

    f(x) = 1/(|x| - 1) * sum_{t >= 2} h_t^(layer)(x)     h^(0) = token embeddings, h^(k) = output of block k

The first token is left out of the mean (for a single-token text it is the mean): from the early
blocks on it carries the attention-sink activations, far larger than any other token's, which would
otherwise dominate the pooled vector. Computed with every PEFT adapter disabled and the CRMA backbone
bypassed, so the features (and the router built on them) never change when later domains train
adapters or the backbone. The forward pass stops right after the chosen block, which is what keeps
routing cheap (benchmarks/route_measure.py measures accuracy and latency per layer). Each text also
gets its characters per token, the router's cheap test for character noise.
"""
from __future__ import annotations

import re
import weakref
from contextlib import ExitStack, contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..method.backbone import CRMABackbone
from ..method.models import decoder_layers
from .router import Features


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass after the chosen block."""


_SCANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _scan(model: nn.Module) -> tuple[list, object, nn.ModuleList]:
    """(PEFT tuner layers, CRMA backbone or None, decoder blocks) of `model`, cached per model until
    its adapters or backbone change: walking SmolLM2's ~5000 modules (five adapters) costs ~3 ms."""

    key = (tuple(getattr(model, "peft_config", None) or ()), id(getattr(model, "crma_backbone", None)))
    cached = _SCANS.get(model)
    if cached is None or cached[0] != key:
        tuners, backbone = [], None
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                tuners.append(m)
            elif isinstance(m, CRMABackbone):
                backbone = m
        cached = (key, (tuners, backbone, decoder_layers(model)))
        _SCANS[model] = cached
    return cached[1]


@contextmanager
def base_model_only(model: nn.Module):
    """Context: `model` computes the untouched base model (no LoRA adapter, CRMA bypassed).

    Sets the `_disable_adapters` flag of every PEFT tuner layer directly (what disable_adapter()
    ends up doing): PeftModel.disable_adapter() first builds a status report of every layer, which
    costs ~70 ms per call on SmolLM2 with five adapters, three times a whole routing decision."""
    tuners, backbone, _ = _scan(model)
    saved = [m._disable_adapters for m in tuners]
    with ExitStack() as stack:
        if backbone is not None:
            stack.enter_context(backbone.bypassed())
        try:
            for m in tuners:
                m._disable_adapters = True
            yield model
        finally:
            for m, flag in zip(tuners, saved, strict=False):
                m._disable_adapters = flag


def resolve_layer(model: nn.Module, layer: int) -> int:
    """Layer index in 0..L: 0 = embeddings, k = output of block k, negative counts from the end
    (-1 = last block). A layer past the model's depth is capped at L (tiny test models have 2)."""
    n = len(_scan(model)[2])
    if layer < 0:
        if n + 1 + layer < 0:
            raise ValueError(f"layer {layer} is out of range for a {n}-block model")
        layer = n + 1 + layer
    return min(layer, n)


@torch.inference_mode()
def hidden_features(model: nn.Module, tokenizer, texts: list[str], layer: int, max_tokens: int = 64,
                    batch_size: int = 16) -> Features:
    """Pooled hidden state at `layer` of the base model, (len(texts), dim) float32, and characters
    per token (len(texts),) of each text truncated to `max_tokens` tokens."""
    if not texts:
        raise ValueError("hidden_features: no texts given")
    layer = resolve_layer(model, layer)
    blocks = _scan(model)[2]
    device = next(model.parameters()).device
    captured: dict[str, torch.Tensor] = {}

    def capture(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output        # (b, s, dim)
        raise _Stop

    pooled, cpt = [], []
    was_training = model.training
    if was_training:                 # train()/eval() walk every module: only when needed
        model.eval()
    handle = blocks[layer - 1].register_forward_hook(capture) if layer > 0 else None
    try:
        with base_model_only(model):
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(texts[start : start + batch_size], truncation=True, max_length=max_tokens,
                                padding=True, return_tensors="pt")
                ids = enc["input_ids"].to(device)                                  # (b, s)
                mask = enc["attention_mask"].to(device)                            # (b, s)
                if layer == 0:
                    h = model.get_input_embeddings()(ids)                          # (b, s, dim)
                else:
                    try:
                        model(input_ids=ids, attention_mask=mask, use_cache=False)
                    except _Stop:
                        pass
                    h = captured.pop("h")                                          # (b, s, dim)
                lengths = mask.sum(1)                                              # (b,)
                w = mask.clone()
                first = mask.argmax(1)                                             # (b,) first real token
                rows = torch.arange(len(ids), device=device)
                w[rows, first] = (lengths <= 1).to(w.dtype)                        # drop it unless alone
                w = w.unsqueeze(-1).to(h.dtype)                                    # (b, s, 1)
                pooled.append(((h * w).sum(1) / w.sum(1).clamp_min(1.0)).float().cpu())  # (b, dim)
                for row, keep in zip(ids.cpu(), mask.cpu().bool(), strict=False):
                    kept = row[keep]                                               # (n,)
                    chars = len(tokenizer.decode(kept, skip_special_tokens=True))
                    cpt.append(chars / max(1, len(kept)))
    finally:
        if handle is not None:
            handle.remove()
        if was_training:
            model.train()
    return Features(torch.cat(pooled), torch.tensor(cpt, dtype=torch.float32))


def text_segments(text: str, min_words: int = 6, max_segments: int = 8) -> list[str]:
    """Cut a passage into query-like pieces: lines, then sentences, merged until each has at least
    `min_words` words; at most `max_segments` of them (a short tail of >= 3 words is kept)."""
    out, cur = [], []
    for line in text.split("\n"):
        pieces = [p for p in re.split(r"(?<=[.!?;:])\s+", line.strip()) if p]
        for k, piece in enumerate(pieces):
            sep = "\n" if k == 0 and cur else " "
            cur.append((sep if cur else "") + piece)
            if len("".join(cur).split()) >= min_words:
                out.append("".join(cur))
                cur = []
            if len(out) >= max_segments:
                return out
    tail = "".join(cur)
    if len(tail.split()) >= min(3, min_words):
        out.append(tail)
    return out


def segments_of(texts: list[str], cfg) -> list[str]:
    """Every passage cut into up to cfg.segments_per_passage query-sized segments of >= cfg.min_words words
    (see text_segments); a passage too short to give one segment is kept whole."""
    out = []
    for t in texts:
        if not t.strip():
            continue
        out += text_segments(t, cfg.min_words, cfg.segments_per_passage) or [t.strip()]
    return out
