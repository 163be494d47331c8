"""The models of the decoding benchmarks (decode_bench.py, thread_pools.py): SmolLM2-135M with a CRMA
backbone at 3 versions and random LoRA adapters (crma's default LoRA settings: the arithmetic of trained
ones), the plain model, and the plain model with one of those adapters and no backbone; and the
questions their chat prompts ask."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crma.config import CRMAConfig, LoraSettings  # noqa: E402
from crma.engine.live import LiveModel  # noqa: E402
from crma.method.adapters import add_adapter  # noqa: E402
from crma.method.models import load_model  # noqa: E402
from crma.serve.registry import Registry, Route, Snapshot  # noqa: E402

QUESTIONS = ["What is a good way to learn a new language?", "Explain photosynthesis in simple terms.",
             "How do I write a function that reverses a list?", "What are the symptoms of the flu?",
             "What does a contract need to be valid?", "How do interest rates affect inflation?",
             "Why is the sky blue?", "Give me three tips for a job interview.", "What is a prime number?",
             "How does a vaccine work?", "What is the difference between weather and climate?",
             "Summarise the plot of Romeo and Juliet.", "How do I make bread at home?",
             "What is machine learning?", "Why do cats purr?", "How far away is the Moon?"]


def build(adapters: int, dtype: torch.dtype, seed: int = 0):
    """(live, registry, snapshot) with `adapters` random LoRA adapters d0..dN and backbone versions 1-3."""
    model, tokenizer = load_model("smollm2-135m", dtype=dtype)
    live = LiveModel(model, tokenizer, "smollm2-135m", "modular")
    backbone = live.create_backbone(CRMAConfig())
    gen = torch.Generator().manual_seed(seed)
    states = {}
    with torch.no_grad():
        for v in (1, 2, 3):
            for block in backbone.crma_blocks:
                block.crma_theta.add_(0.5 * torch.randn(block.crma_theta.shape, generator=gen))
                block.crma_gate.fill_(0.02 * v)
            states[v] = {k: t.clone() for k, t in backbone.state_dict().items()}
        for k in range(adapters):
            live.model = add_adapter(live.model, f"d{k}", LoraSettings())
            for name, p in live.model.named_parameters():
                if f".d{k}." in name and "lora_" in name:
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            live.adapters[f"d{k}"] = 1
    live.model.eval()
    registry = Registry(live, None)
    registry.stack = backbone.stack_versions(states)
    routes = {f"d{k}": Route(f"d{k}", f"d{k}", 1, 1 + k % 3) for k in range(adapters)}
    routes["base"] = Route("base", None, None, 3)
    snapshot = Snapshot(None, None, routes, 1, "bench")
    registry.current = snapshot
    return live, registry, snapshot


def plain(dtype: torch.dtype):
    """(live, registry, snapshot) of SmolLM2 alone: no adapter, no CRMA backbone (route "base")."""
    model, tokenizer = load_model("smollm2-135m", dtype=dtype)
    live = LiveModel(model, tokenizer, "smollm2-135m", "modular")
    live.model.eval()
    registry = Registry(live, None)
    snapshot = Snapshot(None, None, {"base": Route("base", None, None, None)}, 1, "bench")
    registry.current = snapshot
    return live, registry, snapshot


def lora_alone(live, dtype: torch.dtype):
    """plain(dtype) with adapter d0 of `live` (the same LoRA weights) and no CRMA backbone: route "d0"."""
    out, registry, snap = plain(dtype)
    out.model = add_adapter(out.model, "d0", LoraSettings())
    weights = dict(live.model.named_parameters())
    with torch.no_grad():
        for name, p in out.model.named_parameters():
            if ".d0." in name:
                p.copy_(weights[name])
    out.adapters["d0"] = 1
    out.model.eval()
    snap.routes["d0"] = Route("d0", "d0", 1, None)
    return out, registry, snap
