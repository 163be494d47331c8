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

Layers that read the same input (a decoder block's q, k, v projections; its gate and up projections)
can be packed as one group: one GEMM over their weights stacked along the outputs,

    [y_1 | y_2 | ...] = x [W_1; W_2; ...]^T + [b_1 | b_2 | ...]

whose outputs are column views of one result: fewer, larger GEMMs (benchmarks/decode_floor.py).
crma's decoding step (step.py) calls the group; transformers' forward (prefills) calls the layers one
after another on the same input tensor, and each grouped layer's forward takes its part of the
group's result for that tensor, computed at the first of them (kept until the last took its part).

Used for float32 nn.Linear layers on the CPU when torch has oneDNN, and for bfloat16 ones where the CPU
computes bfloat16 natively (AVX-512 BF16 or AMX): bfloat16 `F.linear` runs oneDNN too, but reorders the
weight at every call: about 1.7 times the packed GEMM's time over all of SmolLM2's layers on one row
(benchmarks/decode_floor.py). Anything that needs gradients takes `F.linear`.
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable

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


def _member_forward(module: nn.Linear, group: PackedGroup, i: int, x: torch.Tensor) -> torch.Tensor:
    if x.requires_grad or (module.weight.requires_grad and torch.is_grad_enabled()):
        return F.linear(x, module.weight, module.bias)
    return group.member(i, x)


@functools.cache
def dtypes() -> tuple[torch.dtype, ...]:
    """The weight dtypes oneDNN packs here: float32, and bfloat16 where the CPU computes it natively."""
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


def packs(module: nn.Module) -> bool:
    """Whether `module` takes the packed forward."""
    return (type(module) is nn.Linear and module.weight.device.type == "cpu" and available()
            and module.weight.dtype in dtypes())


class PackedGroup:
    """Linear layers with one input packed as one GEMM: `group(x)` is their outputs [y_1, y_2, ...],
    column views (..., out_i) of one (..., sum out_i) result."""

    def __init__(self, modules: tuple[nn.Linear, ...]):
        self.sizes = [m.out_features for m in modules]
        self.packed = pack(torch.cat([m.weight.detach() for m in modules]))                  # (sum out, in)
        biases = [m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules]
        self.bias = torch.cat(biases).detach() if any(m.bias is not None for m in modules) else None
        self._x, self._ys = None, None                 # the last input and its outputs, for `member`

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(packed_linear(x, self.packed, self.bias, sum(self.sizes)).split(self.sizes, -1))

    def member(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i's output for x: its part of the group's result for this very tensor x, computed once
        for the group's layers called one after another on it (layer 0 and any other x compute again)."""
        if i == 0 or self._x is not x:            # the first layer always starts afresh: nothing stale
            self._x, self._ys = x, self(x)
        y = self._ys[i]
        if i == len(self.sizes) - 1:
            self._x, self._ys = None, None
        return y


class PackedLinears:
    """Gives every plain float32 CPU nn.Linear of a model (PEFT's base layers and the LM head included)
    the packed forward, or packs it with the others of its group; `remove` restores their own forward
    and frees the packed copies."""

    def __init__(self):
        self._model, self.modules, self.groups = None, [], {}

    def install(self, model: nn.Module, groups: Callable[[nn.Module], Iterable[tuple]] = lambda model: ()) -> int:
        """Pack `model`'s linear layers (once per model), those of each tuple that `groups(model)` lists
        together (each layer in one group at most); returns how many take a packed forward."""
        if self._model is not None and self._model() is model:
            return len(self.modules)
        self.remove()
        self._model = weakref.ref(model)
        for layers in groups(model):
            if all(packs(m) for m in layers):
                group = self.groups[tuple(id(m) for m in layers)] = PackedGroup(tuple(layers))
                for i, module in enumerate(layers):                                        # instance attribute
                    module.forward = functools.partial(_member_forward, module, group, i)
                    self.modules.append(module)
        grouped = {id(m) for m in self.modules}
        for module in model.modules():
            if packs(module) and id(module) not in grouped:
                module.forward = functools.partial(_forward, module, pack(module.weight))
                self.modules.append(module)
        return len(self.modules)

    def group(self, modules) -> PackedGroup | None:
        """The packed group of exactly these layers, if `install` made one."""
        return self.groups.get(tuple(id(m) for m in modules))

    def remove(self) -> None:
        for module in self.modules:
            if isinstance(module.__dict__.get("forward"), functools.partial):
                del module.forward
        self._model, self.modules, self.groups = None, [], {}
