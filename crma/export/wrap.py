"""The model the exported LoRA folders of a modular store apply to: the base model with a zero-weight
linear `crma_out` (d -> d) after each decoder block, used as h <- h + crma_out(h).

With zero weight it changes nothing; with the export's LoRA on it (crma/export/lora.py) it is the CRMA step
h + alpha W M R h of the adapter's backbone version. The same rule, `lora.block_output`, is what the vLLM
plugin (crma/export/vllm_plugin.py) runs inside vLLM's decoder blocks; this module is the Hugging Face (PEFT)
side, used by the tests and by anyone checking an export without vLLM.
"""
from __future__ import annotations

from torch import nn

from ..method.models import decoder_layers
from .lora import CRMA_MODULE, block_output


def layers_path(model: nn.Module) -> str:
    """The dotted module path of the decoder blocks' list ('model.layers' in the Llama family)."""
    layers = decoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


def _hook(block: nn.Module, args, output):
    linear = getattr(block, CRMA_MODULE)          # looked up per call: PEFT wraps it in a LoRA layer
    if isinstance(output, tuple):                 # some blocks return (hidden_states, ...)
        return (block_output(output[0], linear),) + output[1:]
    return block_output(output, linear)


def add_crma_linears(model: nn.Module) -> nn.Module:
    """Give each decoder block of `model` (in place) a zero-weight `crma_out` linear applied to its output.
    Returns `model`; PEFT's from_pretrained then finds the modules the exported LoRA targets."""
    param = next(model.parameters())
    d = model.config.hidden_size
    for block in decoder_layers(model):
        if hasattr(block, CRMA_MODULE):
            raise ValueError(f"{type(block).__name__} already has a {CRMA_MODULE} module")
        linear = nn.Linear(d, d, bias=False, device=param.device, dtype=param.dtype)
        nn.init.zeros_(linear.weight)                                              # (d, d) zeros
        linear.weight.requires_grad_(False)
        block.add_module(CRMA_MODULE, linear)
        block.register_forward_hook(_hook)
    return model
