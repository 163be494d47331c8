"""One row through linear layers (a decoding step of one stream) as a reduction kernel compiled by torch's
inductor, reading the model's own weights.

On one row a linear layer is a GEMV, bound by reading its weights. oneDNN's packed GEMM (linear.py), the
fastest of torch's GEMMs from a few rows on, reads them on one row well below the rate this CPU streams
memory, and each of its calls costs about 14 µs before it reads anything. Written as the reduction it is,

    y_o = sum_i x_i W_oi  (+ b_o)                 x (1, in), W (out, in), y (1, out)

inductor compiles it into one C++ loop nest, vectorised along i and parallel over o, that reads W once in
its own row-major layout: 28-34 GB/s on SmolLM2's block projections, where oneDNN reads 19-26 and
`torch.sum` 37-38 (`benchmarks/decode_floor.py`, section 9). Layers that read the same input (a block's
q, k, v projections) are one kernel whose outputs lie side by side, as PackedGroup's are. In bfloat16 the
products and the sum are float32 and the result is rounded once, as oneDNN's bfloat16 GEMM does. The
sum runs in another order than oneDNN's or MKL's, so the last bits differ.

One kernel is compiled per (dtype, number of layers, which have biases, thread count), with symbolic
sizes, so every model and group shape shares it: `torch._inductor.standalone_compile`, a compiled graph
called directly (no Dynamo guards per call), kept for the process; inductor's own cache on disk makes
later processes compile faster. Compiling needs a C++ compiler; where it fails the layers keep oneDNN
(logged once).
"""
from __future__ import annotations

import functools
import logging
import threading
import time

import torch
from torch.fx.experimental.proxy_tensor import make_fx

log = logging.getLogger("crma.serve")
DTYPES = (torch.float32, torch.bfloat16)

_kernels: dict[tuple, object] = {}
_lock = threading.Lock()
_failed: list[str] = []                 # the first compile error, once one happened: no further tries


def row_product(x: torch.Tensor, *params: torch.Tensor, biased: tuple[bool, ...]) -> torch.Tensor:
    """[y_1 | y_2 | ...] (1, sum out_i) for x (1, in): y_i = x W_i^T (+ b_i), computed in float32 as
    sum_j x_j W_ij, rounded once to x's dtype. params: the weights W_i (out_i, in), then the biases of
    the layers that `biased` marks."""
    weights, biases = params[:len(biased)], iter(params[len(biased):])
    xf = x.float()                                                                  # (1, in)
    outs = []
    for w, has_bias in zip(weights, biased, strict=True):
        y = (xf * w.float()).sum(-1)                                                # (out_i,)
        outs.append(y + next(biases).float() if has_bias else y)
    y = outs[0] if len(outs) == 1 else torch.cat(outs)                              # (sum out_i,)
    return y.to(x.dtype)[None]                                                      # (1, sum out_i)


def _compile(dtype: torch.dtype, biased: tuple[bool, ...]):
    """row_product for len(biased) layers, traced with symbolic sizes and compiled. The example sizes
    differ from each other: sizes equal in the example would be traced as one symbol."""
    d_in, outs = 36, [40 + 8 * i for i in range(len(biased))]
    example = [torch.zeros(1, d_in, dtype=dtype), *(torch.zeros(o, d_in, dtype=dtype) for o in outs),
               *(torch.zeros(o, dtype=dtype) for o, b in zip(outs, biased, strict=True) if b)]
    graph = make_fx(functools.partial(row_product, biased=biased), tracing_mode="symbolic")(*example)
    return torch._inductor.standalone_compile(graph, example, dynamic_shapes="from_graph")


def _kernel(dtype: torch.dtype, biased: tuple[bool, ...]):
    """The compiled kernel (compiled now if new), or None where compiling failed."""
    key = (dtype, biased, torch.get_num_threads())
    with _lock:
        if key not in _kernels and not _failed:
            try:
                started = time.perf_counter()
                with torch.no_grad():
                    _kernels[key] = _compile(dtype, biased)
                log.info("compiled the one-row linear kernel for %d %s layer(s) in %.1f s", len(biased),
                         str(dtype).removeprefix("torch."), time.perf_counter() - started)
            except Exception as exc:                 # noqa: BLE001 - no compiler, or inductor refuses: oneDNN stays
                _failed.append(f"{type(exc).__name__}: {exc}")
                log.warning("one-row linear kernels could not be compiled (%s); oneDNN computes one-row steps",
                            _failed[0].splitlines()[0][:300])
        return _kernels.get(key)


def compile_error() -> str | None:
    """Why the kernels could not be compiled in this process, if they could not."""
    return _failed[0] if _failed else None


class RowGemv:
    """y = [x W_1^T + b_1 | x W_2^T + b_2 | ...] for one row x (1, in), by one compiled kernel over the
    layers' own weights (no copy); `ok` is False where it cannot run (then the caller computes y)."""

    def __init__(self, weights: tuple[torch.Tensor, ...], biases: tuple[torch.Tensor | None, ...]):
        ws = [w.detach() for w in weights]
        self.biased = tuple(b is not None for b in biases)
        self.params = ws + [b.detach() for b in biases if b is not None]
        self.dtype = ws[0].dtype
        self.ok = (self.dtype in DTYPES and len({w.shape[1] for w in ws}) == 1
                   and all(p.dtype == self.dtype and p.device.type == "cpu" and p.is_contiguous()
                           and min(p.shape) > 1 for p in self.params))     # a size 1 would not be symbolic
        self._kernel = _kernel(self.dtype, self.biased) if self.ok else None
        self.ok = self._kernel is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (1, in) contiguous, in the weights' dtype -> (1, sum out_i)."""
        return self._kernel(x, *self.params)
