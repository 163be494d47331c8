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

crma's decoding step (step.py) folds more of a one-row block into these kernels (`RowGemv.fitting`
gives the variant): the RMSNorm before q|k|v and gate|up, the row's LoRA update, and at the block's end
the residual and the row's CRMA operator,

    x = rmsnorm(h) g                                    computed from h inside the kernel
    y = round(round(x W^T + b) + D U),  U = x A^T       A (R, in), D (sum out_i, R): the B_i s_i on a
                                                        block diagonal; U and D U in float32
    h' = z + Q (P z),  z = h + y                        (down_proj) P = M R (n, d), Q = alpha W (d, n)

each sum rounded where the step rounds it (identities in float32). On one row every torch operator
costs microseconds whatever its size, and each group otherwise takes an RMSNorm's half-dozen, two more
products with, in bfloat16, two conversions (lora_rows.py), and CRMA's four.
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


def row_product(x: torch.Tensor, *params: torch.Tensor, biased: tuple[bool, ...], norm: float | None = None,
                lora: bool = False, crma: bool = False) -> torch.Tensor:
    """[y_1 | y_2 | ...] (1, sum out_i) for x (1, in): y_i = x W_i^T (+ b_i), computed in float32 as
    sum_j x_j W_ij, rounded once to x's dtype. params: the weights W_i (out_i, in), then the biases of
    the layers that `biased` marks; with `norm` (its epsilon) the RMSNorm weight g (in,), the layers
    then reading rmsnorm(x) g = x / sqrt(mean(x^2) + eps) g (as step.rms_norm rounds it); with `lora`
    A (R, in) and D (sum out_i, R): y + D (x A^T), the update in float32 added to the rounded y and
    rounded again; with `crma` the residual stream h (1, d = sum out_i) and a row's CRMA operators
    P (n, d) = M R and Q (d, n) = alpha W: z + Q (P z) with z = h + y, each sum rounded as the decoding
    step rounds it."""
    if crma:
        params, (h, p, q) = params[:-3], params[-3:]
    if lora:
        params, (a, d) = params[:-2], params[-2:]
    if norm is not None:
        params, g = params[:-1], params[-1]
        hf = x.float()                                                              # (1, in)
        x = g * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + norm)).to(x.dtype)
    weights, biases = params[:len(biased)], iter(params[len(biased):])
    xf = x.float()                                                                  # (1, in)
    outs = []
    for w, has_bias in zip(weights, biased, strict=True):
        y = (xf * w.float()).sum(-1)                                                # (out_i,)
        outs.append(y + next(biases).float() if has_bias else y)
    y = (outs[0] if len(outs) == 1 else torch.cat(outs)).to(x.dtype)               # (sum out_i,)
    if lora:
        u = (xf * a.float()).sum(-1)                                                # (R,)
        y = (y.float() + (d.float() * u).sum(-1)).to(x.dtype)                       # (sum out_i,)
    if crma:
        z = (h[0].float() + y.float()).to(x.dtype)                                  # (d,)
        mixed = (z.float() * p.float()).sum(-1)                                     # (n,)
        y = (z.float() + (q.float() * mixed).sum(-1).to(x.dtype).float()).to(x.dtype)  # (d,)
    return y[None]                                                                  # (1, sum out_i)


def _compile(dtype: torch.dtype, biased: tuple[bool, ...], norm: float | None, lora: torch.dtype | None,
             crma: torch.dtype | None):
    """row_product for len(biased) layers (with `norm`, an RMSNorm of that epsilon first; with `lora`,
    an update in that dtype; with `crma`, CRMA's operators in that dtype), traced with symbolic sizes and
    compiled. The example sizes differ from each other, but for g's and h's, which are the input's and
    the outputs': equal sizes are traced as one symbol."""
    d_in, outs, rank, streams = 36, [40 + 8 * i for i in range(len(biased))], 20, 12
    example = [torch.zeros(1, d_in, dtype=dtype), *(torch.zeros(o, d_in, dtype=dtype) for o in outs),
               *(torch.zeros(o, dtype=dtype) for o, b in zip(outs, biased, strict=True) if b)]
    if norm is not None:
        example.append(torch.ones(d_in, dtype=dtype))
    if lora is not None:
        example += [torch.zeros(rank, d_in, dtype=lora), torch.zeros(sum(outs), rank, dtype=lora)]
    if crma is not None:
        example += [torch.zeros(1, sum(outs), dtype=dtype), torch.zeros(streams, sum(outs), dtype=crma),
                    torch.zeros(sum(outs), streams, dtype=crma)]
    product = functools.partial(row_product, biased=biased, norm=norm, lora=lora is not None, crma=crma is not None)
    graph = make_fx(product, tracing_mode="symbolic")(*example)
    return torch._inductor.standalone_compile(graph, example, dynamic_shapes="from_graph")


def _kernel(dtype: torch.dtype, biased: tuple[bool, ...], norm: float | None = None,
            lora: torch.dtype | None = None, crma: torch.dtype | None = None):
    """The compiled kernel (compiled now if new), or None where compiling failed."""
    key = (dtype, biased, norm, lora, crma, torch.get_num_threads())
    with _lock:
        if key not in _kernels and not _failed:
            try:
                started = time.perf_counter()
                with torch.no_grad():
                    _kernels[key] = _compile(dtype, biased, norm, lora, crma)
                parts = [what for what, on in (("RMSNorm", norm is not None), ("LoRA", lora), ("CRMA", crma)) if on]
                log.info("compiled the one-row linear kernel for %d %s layer(s)%s in %.1f s", len(biased),
                         str(dtype).removeprefix("torch."), f" with {', '.join(parts)}" if parts else "",
                         time.perf_counter() - started)
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
        self.dtype, self.shape = ws[0].dtype, (sum(w.shape[0] for w in ws), ws[0].shape[1])   # (sum out, in)
        self.ok = (self.dtype in DTYPES and len({w.shape[1] for w in ws}) == 1
                   and all(_fits(p) and p.dtype == self.dtype for p in self.params))
        self._variants: dict[tuple, object] = {}      # (RMSNorm epsilon, LoRA dtype, CRMA dtype) -> kernel
        self._kernel = self.variant(None, None, None)
        self.ok = self._kernel is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (1, in) contiguous, in the weights' dtype -> (1, sum out_i)."""
        return self._kernel(x, *self.params)

    def variant(self, norm: float | None, lora: torch.dtype | None, crma: torch.dtype | None):
        """The kernel that first normalises x (RMSNorm of epsilon `norm`), adds a LoRA update held in dtype
        `lora` and/or ends a block with CRMA operators in dtype `crma` (compiled now if new), or None."""
        key = (norm, lora, crma)
        if key not in self._variants:
            self._variants[key] = (_kernel(self.dtype, self.biased, *key) if self.ok and all(
                t is None or t.is_floating_point for t in key[1:]) else None)
        return self._variants[key]

    def fitting(self, norm: tuple | None, update: tuple | None, block: tuple | None):
        """The kernel for `norm` (g (in,), epsilon), `update` (A (R, in), D (sum out, R)) and `block`
        (h (1, sum out), P (n, sum out), Q (sum out, n)), any of them None, called as
        kernel(x, *params, g, *update, *block); None where it does not take them."""
        out, d_in = self.shape
        if norm is not None and not (norm[0].shape == (d_in,) and norm[0].dtype == self.dtype
                                     and norm[0].is_contiguous()):
            return None
        if update is not None:
            a, d = update
            if not (a.dtype == d.dtype and _fits(a) and _fits(d) and a.shape[1] == d_in
                    and d.shape == (out, a.shape[0])):
                return None
        if block is not None:
            h, p, q = block
            if not (h.shape == (1, out) and h.dtype == self.dtype and h.is_contiguous() and p.dtype == q.dtype
                    and _fits(p) and _fits(q) and p.shape[1] == out and q.shape == (out, p.shape[0])):
                return None
        return self.variant(None if norm is None else float(norm[1]),
                            *(None if t is None else t[-1].dtype for t in (update, block)))


def _fits(p: torch.Tensor) -> bool:
    """Whether the kernels take p: contiguous on the CPU, no size 1 (which would not be symbolic)."""
    return p.device.type == "cpu" and p.is_contiguous() and min(p.shape) > 1
