"""Linear layers of a serving model on the CPU as oneDNN GEMMs on weights packed once.

On a CPU torch computes `F.linear` in float32 with MKL, whose GEMM over a few rows is far from what
the machine can do: every linear layer of SmolLM2 applied once to one row takes about as long on two
threads as on one, and three rows take twice as long as one (decoding steps are such GEMMs).
oneDNN, which torch also carries (its inductor backend uses it for CPU linear layers), computes

    y = x W^T + b

from a copy of W reordered once into its own blocked layout (`torch.ops.mkldnn._reorder_linear_weight`,
then `torch.ops.mkldnn._linear_pointwise` per call), and is faster at every batch size measured, the
most at a few rows (`benchmarks/decode_bench.py` compares it side by side with `F.linear`; results in
docs/serving.md). The packed copy is the cost: the linear layers' weights are held twice while serving.

Used for float32 nn.Linear layers on the CPU when torch has oneDNN; bfloat16 `F.linear` runs on oneDNN
already, and anything that needs gradients takes `F.linear`.
"""
from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

PACK_ROWS = 16          # the row count the weights are packed for (a hint: any row count works)


def available() -> bool:
    """Whether this torch has oneDNN's packed linear operators."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """W (out, in) reordered into oneDNN's layout for a GEMM of about PACK_ROWS rows (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out: int) -> torch.Tensor:
    """y = x W^T + b with W packed by `pack`: x (..., in) -> (..., out)."""
    flat = x.reshape(-1, x.shape[-1])                                                   # (m, in)
    y = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), packed, bias, "none", [], "")   # (m, out)
    return y.reshape(*x.shape[:-1], out)


def _forward(module: nn.Linear, packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if x.requires_grad or (module.weight.requires_grad and torch.is_grad_enabled()):
        return F.linear(x, module.weight, module.bias)
    return packed_linear(x, packed, module.bias, module.out_features)


def packs(module: nn.Module) -> bool:
    """Whether `module` takes the packed forward."""
    return (type(module) is nn.Linear and module.weight.dtype == torch.float32
            and module.weight.device.type == "cpu" and available())


class PackedLinears:
    """Gives every plain float32 CPU nn.Linear of a model (PEFT's base layers and the LM head included)
    the packed forward; `remove` restores their own forward and frees the packed copies."""

    def __init__(self):
        self._model, self.modules = None, []

    def install(self, model: nn.Module) -> int:
        """Pack `model`'s linear layers (once per model); returns how many take the packed forward."""
        if self._model is not None and self._model() is model:
            return len(self.modules)
        self.remove()
        self._model = weakref.ref(model)
        for module in model.modules():
            if packs(module):
                module.forward = functools.partial(_forward, module, pack(module.weight))   # instance attribute
                self.modules.append(module)
        return len(self.modules)

    def remove(self) -> None:
        for module in self.modules:
            if isinstance(module.__dict__.get("forward"), functools.partial):
                del module.forward
        self._model, self.modules = None, []
