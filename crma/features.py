"""Router features: the BASE model's own hidden state at one layer, mean-pooled over the tokens.

    f(x) = (1 / |x|) * sum_t h_t^(layer)(x)        h^(0) = token embeddings, h^(k) = output of block k

Computed with every PEFT adapter disabled and the CRMA backbone bypassed, so the features (and the
router built on them) never change when later domains train adapters or the backbone. The forward
pass stops right after the chosen block (the rest of the model is not run), which is what keeps
routing cheap: see benchmarks/route_measure.py for accuracy and latency per layer.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from .adapters import active
from .models import decoder_layers


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass after the chosen block."""


def find_backbone(model: nn.Module):
    """The attached CRMABackbone of `model` (also under a PeftModel), or None."""
    found = [m for m in model.modules() if type(m).__name__ == "CRMABackbone"]
    return found[0] if found else None


@contextmanager
def base_model_only(model: nn.Module):
    """Context: `model` computes the untouched base model (no LoRA adapter, CRMA bypassed)."""
    with ExitStack() as stack:
        stack.enter_context(active(model, None))
        backbone = find_backbone(model)
        if backbone is not None:
            stack.enter_context(backbone.bypassed())
        yield model


def resolve_layer(model: nn.Module, layer: int) -> int:
    """Layer index in 0..L: 0 = embeddings, k = output of block k, negative counts from the end
    (-1 = last block). A layer past the model's depth is capped at L (tiny test models have 2)."""
    n = len(decoder_layers(model))
    if layer < 0:
        layer = n + 1 + layer
        if layer < 0:
            raise ValueError(f"layer {layer - n - 1} is out of range for a {n}-block model")
    return min(layer, n)


@torch.inference_mode()
def hidden_features(model: nn.Module, tokenizer, texts: list[str], layer: int, max_tokens: int = 64,
                    batch_size: int = 16) -> torch.Tensor:
    """Mean-pooled hidden state at `layer` of the base model for each text: (len(texts), d) float32.

    Texts are truncated to `max_tokens` tokens; padding is excluded from the mean."""
    if not texts:
        raise ValueError("hidden_features: no texts given")
    layer = resolve_layer(model, layer)
    blocks = decoder_layers(model)
    device = next(model.parameters()).device
    captured: dict[str, torch.Tensor] = {}

    def capture(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output        # (b, s, d)
        raise _Stop

    out = []
    was_training = model.training
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
                    h = model.get_input_embeddings()(ids)                          # (b, s, d)
                else:
                    try:
                        model(input_ids=ids, attention_mask=mask, use_cache=False)
                    except _Stop:
                        pass
                    h = captured.pop("h")                                          # (b, s, d)
                w = mask.unsqueeze(-1).to(h.dtype)                                 # (b, s, 1)
                pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)                  # (b, d)
                out.append(pooled.float().cpu())
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    return torch.cat(out)                                                          # (n, d)


def token_windows(tokenizer, texts: list[str], window: int, max_windows: int) -> list[str]:
    """Split each text into up to `max_windows` consecutive windows of `window` tokens, decoded back
    to text, so router statistics are computed on inputs as long as the queries they will route.

    Windows shorter than window/4 tokens (a passage's tail) are dropped unless they are the first."""
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        for k, start in enumerate(range(0, len(ids), window)):
            if k >= max_windows:
                break
            piece = ids[start : start + window]
            if k > 0 and len(piece) < max(1, window // 4):
                break
            text = tokenizer.decode(piece)
            if text.strip():
                out.append(text)
    return out
