"""The vLLM model plugin for a modular store's export: vLLM's Llama with a zero-weight `crma_out` linear after
each decoder block, so that every exported LoRA (adapter + its backbone version, crma/export/lora.py) runs its
CRMA steps inside vLLM, each request on its own backbone version, batched together with the others.

Registered through the `vllm.general_plugins` entry point (pyproject.toml); `crma export` names the
architecture in its launch command (--hf-overrides '{"architectures": ["CrmaLlamaForCausalLM"]}'). Imported by
vLLM only: it needs torch, vllm (tested with 0.32.0) and crma/export/lora.py, nothing else of crma.

vLLM's decoder block returns its output split in two, (x, residual) with h = x + residual (the sum is taken
by the next block's fused add-and-norm). The plugin forms h, applies the same rule as the Hugging Face side,
h' = lora.block_output(h, crma_out) = h + crma_out(h), and returns (h', 0): the next fused add gives h' exactly.
"""
from __future__ import annotations

import torch
from vllm import ModelRegistry
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

from .lora import CRMA_MODULE, block_output

ARCHITECTURE = "CrmaLlamaForCausalLM"
TESTED_VLLM = ("0.32.0",)


class CrmaLlamaDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama block, then h <- h + crma_out(h) with crma_out a zero-weight (d, d) linear (LoRA target)."""

    def __init__(self, vllm_config, prefix: str = "", config=None, **kwargs):
        super().__init__(vllm_config, prefix=prefix, config=config, **kwargs)
        d = self.hidden_size
        linear = ReplicatedLinear(d, d, bias=False, quant_config=None, prefix=f"{prefix}.{CRMA_MODULE}")
        self.add_module(CRMA_MODULE, linear)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, residual = super().forward(positions, hidden_states, residual, **kwargs)
        h = hidden_states + residual                                              # (tokens, d) the block's output
        out = block_output(h, lambda x: getattr(self, CRMA_MODULE)(x)[0])         # (tokens, d) h + s B A h
        return out, torch.zeros_like(out)


class CrmaLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose blocks are CrmaLlamaDecoderLayer; the crma_out weights are zeros, not read from
    the checkpoint (the exported base model is the plain one)."""

    def __init__(self, *, vllm_config, prefix: str = "", layer_type=CrmaLlamaDecoderLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    def load_weights(self, weights) -> set[str]:
        loaded = set(super().load_weights(weights))
        for name, param in self.named_parameters():
            if f".{CRMA_MODULE}." in name:
                with torch.no_grad():
                    param.zero_()                                                 # (d, d) zeros
                loaded.add(name)
        return loaded


def register() -> None:
    """The `vllm.general_plugins` entry point: make the architecture known to vLLM (in every process it starts)."""
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:{ARCHITECTURE}")
