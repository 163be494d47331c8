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

One row (a decoding step of one stream) is the exception: there oneDNN reads the weights at about half
the rate the machine streams them, and gemv.py's compiled kernels, which read the layers' own weights,
compute it instead where they compile (`PackedLinears(row_gemv=True)`, `crma serve`'s default).

Used for float32 nn.Linear layers on the CPU when torch has oneDNN, and for bfloat16 ones where the CPU
computes bfloat16 natively (AVX-512 BF16 or AMX): bfloat16 `F.linear` runs oneDNN too, but reorders the
weight at every call, and is markedly slower than the packed GEMM over all of SmolLM2's layers on one
row (benchmarks/decode_floor.py). Anything that needs gradients takes `F.linear`.

With `half` (`crma serve --packed-linears float16`), float32 layers keep their weights packed as float16
instead, computed in float32 by FBGEMM (`torch.ops.quantized.linear_prepack_fp16`, then
`linear_dynamic_fp16` per call; the same kernels as torch's dynamic float16 quantization):

    y = x fp16(W)^T + b          x, y and b float32; fp16(W): W rounded to float16 (stored so)

A decoding step reads every weight once per token, and on a few rows half the bytes is close to half
the time (decode_floor.py times all of SmolLM2's layers on one row both ways). The weights are then what
llama.cpp's F16 files hold. The activations stay float32, so the only rounding is the weights'
(10 mantissa bits, against bfloat16's 7). A layer whose weights do not fit float16's range (|w| >
65504) keeps the float32 packing.
"""
from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .gemv import RowGemv

log = logging.getLogger("crma.serve")
PACK_ROWS = 16          # the row count oneDNN's weights are packed for (a hint: any row count works)
HALF_MAX = 65504.0      # float16's largest finite value


def available() -> bool:
    """Whether this torch has oneDNN's packed linear operators."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@functools.cache
def half_available() -> bool:
    """Whether this torch has FBGEMM's float16-weight linear operators."""
    return ("fbgemm" in torch.backends.quantized.supported_engines
            and hasattr(torch.ops.quantized, "linear_prepack_fp16")
            and hasattr(torch.ops.quantized, "linear_dynamic_fp16"))


class Packed:
    """y = x W^T + b from W (out, in) and b packed once: oneDNN's blocked layout of W, in W's dtype, or
    with `half` FBGEMM's float16 copy of a float32 W (x and y float32). `packed(x)`: x (..., in) ->
    (..., out). A single row goes through `row` (gemv.py's compiled kernel over the same layers' own
    weights) where given."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, half: bool = False,
                 row: RowGemv | None = None):
        weight = weight.detach()
        bias = bias.detach() if bias is not None else None
        self.out, self.half = weight.shape[0], half
        self.row = row if row is not None and row.ok else None
        if half:
            self.weight, self.bias = torch.ops.quantized.linear_prepack_fp16(weight, bias), None
        else:
            self.weight, self.bias = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS), bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.is_contiguous():                                          # a decoding step's rows
            return self._gemm(x)
        flat = x.reshape(-1, x.shape[-1]).contiguous()                                  # (m, in)
        return self._gemm(flat).reshape(*x.shape[:-1], self.out)

    def _gemm(self, flat: torch.Tensor) -> torch.Tensor:
        """(m, in) contiguous -> (m, out)."""
        if self.row is not None and flat.shape[0] == 1 and flat.dtype == self.row.dtype:
            return self.row(flat)
        if self.half:
            return torch.ops.quantized.linear_dynamic_fp16(flat, self.weight)
        return torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")


def _row(modules: tuple[nn.Linear, ...]) -> RowGemv:
    """gemv.py's one-row kernel over these layers' own weights and biases (outputs side by side)."""
    return RowGemv(tuple(m.weight for m in modules), tuple(m.bias for m in modules))


def _forward(module: nn.Linear, packed: Packed, x: torch.Tensor) -> torch.Tensor:
    if x.requires_grad or (module.weight.requires_grad and torch.is_grad_enabled()):
        return F.linear(x, module.weight, module.bias)
    return packed(x)


def _member_forward(module: nn.Linear, group: PackedGroup, i: int, x: torch.Tensor) -> torch.Tensor:
    if x.requires_grad or (module.weight.requires_grad and torch.is_grad_enabled()):
        return F.linear(x, module.weight, module.bias)
    return group.member(i, x)


@functools.cache
def dtypes() -> tuple[torch.dtype, ...]:
    """The weight dtypes oneDNN packs here: float32, and bfloat16 where the CPU computes it natively."""
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


def packs(module: nn.Module) -> bool:
    """Whether `module` takes the packed forward (in its own dtype)."""
    return (type(module) is nn.Linear and module.weight.device.type == "cpu" and available()
            and module.weight.dtype in dtypes())


def packs_half(module: nn.Module) -> bool:
    """Whether `module` can take the float16-weight forward: a float32 CPU nn.Linear whose weights fit
    float16's range (its bias stays float32)."""
    return (type(module) is nn.Linear and module.weight.device.type == "cpu" and half_available()
            and module.weight.dtype == torch.float32 and bool(module.weight.detach().abs().max() <= HALF_MAX))


class PackedGroup:
    """Linear layers with one input packed as one GEMM: `group(x)` is their outputs [y_1, y_2, ...],
    column views (..., out_i) of one (..., sum out_i) result."""

    def __init__(self, modules: tuple[nn.Linear, ...], half: bool = False, row_gemv: bool = False):
        self.sizes = [m.out_features for m in modules]
        biases = [m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules]
        bias = torch.cat(biases) if any(m.bias is not None for m in modules) else None
        row = _row(modules) if row_gemv else None
        self.packed = Packed(torch.cat([m.weight.detach() for m in modules]), bias, half, row)   # (sum out, in)
        self._x, self._ys = None, None                 # the last input and its outputs, for `member`

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.packed(x).split(self.sizes, -1))

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
    the packed forward (with `half`, float16 weights where they fit), or packs it with the others of its
    group; `remove` restores their own forward and frees the packed copies."""

    def __init__(self, half: bool = False, row_gemv: bool = True):
        self.half, self.row_gemv = half, row_gemv
        self._model, self.modules, self.groups, self.rows = None, [], {}, {}

    def _mode(self, layers) -> bool | None:
        """How `layers` are packed together: True float16 weights, False their own dtype, None not at all."""
        if self.half and all(packs_half(m) for m in layers):
            return True
        return False if all(packs(m) for m in layers) else None

    def install(self, model: nn.Module, groups: Callable[[nn.Module], Iterable[tuple]] = lambda model: (),
                skip: Callable[[nn.Module], set[int]] = lambda model: set()) -> int:
        """Pack `model`'s linear layers (once per model), those of each tuple that `groups(model)` lists
        together (each layer in one group at most), none of those whose id `skip(model)` lists (adapter
        weights, say); returns how many take a packed forward."""
        if self._model is not None and self._model() is model:
            return len(self.modules)
        self.remove()
        self._model = weakref.ref(model)
        skipped, halves = skip(model), 0
        for layers in groups(model):
            half = self._mode(layers)
            if half is not None:
                halves += half
                group = self.groups[tuple(id(m) for m in layers)] = PackedGroup(tuple(layers), half,
                                                                                 self._rows(half))
                for i, module in enumerate(layers):                                        # instance attribute
                    module.forward = functools.partial(_member_forward, module, group, i)
                    self.modules.append(module)
                self._keep_row(layers, group.packed)
        grouped = {id(m) for m in self.modules}
        for module in model.modules():
            half = self._mode((module,)) if id(module) not in grouped and id(module) not in skipped else None
            if half is not None:
                halves += half
                row = _row((module,)) if self._rows(half) else None
                packed = Packed(module.weight, module.bias, half, row)
                module.forward = functools.partial(_forward, module, packed)
                self.modules.append(module)
                self._keep_row((module,), packed)
        if self.half and not halves:
            log.warning("float16 packing asked for, but no linear layer took it (it needs float32 layers on the "
                        "CPU and a torch with FBGEMM): they compute %s", "packed" if self.modules else "with F.linear")
        return len(self.modules)

    def _rows(self, half: bool) -> bool:
        """Whether layers packed this way take gemv.py's kernels for one row (not FBGEMM's float16 weights)."""
        return self.row_gemv and not half

    def _keep_row(self, layers, packed: Packed) -> None:
        if packed.row is not None:
            self.rows[tuple(id(m) for m in layers)] = packed.row

    def group(self, modules) -> PackedGroup | None:
        """The packed group of exactly these layers, if `install` made one."""
        return self.groups.get(tuple(id(m) for m in modules))

    def row(self, modules) -> RowGemv | None:
        """The one-row kernel of exactly these layers (a packed group, or one layer packed alone), if any."""
        return self.rows.get(tuple(id(m) for m in modules))

    def remove(self) -> None:
        for module in self.modules:
            if isinstance(module.__dict__.get("forward"), functools.partial):
                del module.forward
        self._model, self.modules, self.groups, self.rows = None, [], {}, {}
