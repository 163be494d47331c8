"""Per-row LoRA by gathering stacked adapter weights: one LoRA operation per layer whatever the adapter mix.

Every LoRA layer keeps its adapters' weights in slots of two stacks, A^T (S, in, r) and (s B)^T
(S, r, out), padded to the layer's largest rank with zeros; slot 0 is all zeros (rows without an
adapter). A row b with slot k_b gets

    y_b = W x_b + x_b A_{k_b}^T (s_{k_b} B_{k_b})^T

as two batched matmuls per layer whatever the adapter mix: the rows' slices of the stacks are gathered
once, A_R^T (b, in, r) and B_R (b, r, out), and kept while the rows' slots stay the same (consecutive
decoding steps), so a step only multiplies:

    delta = bmm(bmm(X, A_R^T), B_R)            X (b, s, in) -> (b, s, r) -> (b, s, out)

That is r (in + out) multiply-adds per row and layer. The alternative, concatenating the u distinct
adapters along the rank and masking each row to its own block, reads each adapter once but does u
times the work: over 16 rank-8 adapters on every projection of SmolLM2, about 30% of the base model's
own multiply-adds. With the gathered copies a 16-row SmolLM2 step over 16 adapters costs a few percent
more than over one, mostly the reading of sixteen adapters' weights (benchmarks/results/decode_bench.md).
Rows that all share one adapter take its weights directly, rows without any adapter nothing. PEFT's
own mixed-adapter path loops over the adapters inside every LoRA layer (~100 ms of a 16-row SmolLM2 step with five
adapters). Under transformers' forward PEFT computes W x (its adapters are switched off) and a forward
hook on the LoRA layer adds the rows' updates; crma's own decoding step (step.py) calls `add` for
each group of projections that read one input (q, k, v; gate, up), which takes one A product per group:
U = X [A_q^T | A_k^T | A_v^T], then y_q += U_q B_q and so on, in place; when the rows share one adapter,
one product with diag(B_q, B_k, B_v) into the group's outputs side by side instead (the zero blocks
cost little against the dispatch of the operations they save: on one row every operation costs
microseconds whatever its size; decode_floor.py sets a step against its linear layers alone). One row
(a single stream) with gemv.py's kernels takes neither: `row_weights` hands the adapter's A and
diag(B_q, B_k, B_v) to the group's kernel, which folds the update into its own reduction.

Loading or unloading an adapter updates the stacks incrementally (`sync`): a new adapter takes a free
slot (the stacks double when full) and only its own weights are copied; a dropped adapter's slot is
freed.
"""
from __future__ import annotations

from contextlib import contextmanager
from itertools import accumulate

import torch
from peft.tuners.lora import LoraLayer

NO_ADAPTER_SLOT = 0


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class _LayerStack:
    """One LoRA layer's slots: a (S, in, r) and b (S, r, out)."""

    def __init__(self, layer: LoraLayer, name: str, slots: int):
        ref, out = layer.lora_A[name].weight, layer.lora_B[name].weight                 # (r, in), (out, r)
        self.a = torch.zeros(slots, ref.shape[1], ref.shape[0], dtype=ref.dtype, device=ref.device)
        self.b = torch.zeros(slots, ref.shape[0], out.shape[0], dtype=ref.dtype, device=ref.device)

    def grow(self, slots: int, rank: int) -> None:
        """At least `slots` slots and rank `rank` (zero padding; what is stored is kept)."""
        s, d_in, r = self.a.shape
        if slots <= s and rank <= r:
            return
        a = self.a.new_zeros(max(s, slots), d_in, max(r, rank))
        b = self.b.new_zeros(max(s, slots), max(r, rank), self.b.shape[2])
        a[:s, :, :r], b[:s, :r, :] = self.a, self.b
        self.a, self.b = a, b

    def put(self, slot: int, layer: LoraLayer, name: str) -> None:
        wa, wb = layer.lora_A[name].weight, layer.lora_B[name].weight                 # (r, in), (out, r)
        self.grow(slot + 1, wa.shape[0])
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.a[slot, :, : wa.shape[0]] = wa.T
        self.b[slot, : wb.shape[1], :] = (wb * layer.scaling[name]).T

    def clear(self, slot: int) -> None:
        if slot < self.a.shape[0]:
            self.a[slot].zero_()
            self.b[slot].zero_()


def _diagonal(modules: tuple, parts: list) -> torch.Tensor | None:
    """diag(B_1, B_2, ...) (R, sum out_i): module i's B (r_i, out_i) at its rows of U and its columns of
    the modules' outputs side by side (zero columns for a module without LoRA); None if a module's output
    size is unknown."""
    sizes = [getattr(m, "out_features", None) for m in modules]
    if None in sizes:
        return None
    starts = [0, *accumulate(sizes)]
    ref = parts[0][3]
    out = ref.new_zeros(parts[-1][2], starts[-1])
    for i, lo, hi, b in parts:
        out[lo:hi, starts[i]:starts[i + 1]] = b
    return out


def _add_product(y: torch.Tensor, u: torch.Tensor, b: torch.Tensor) -> None:
    """y += u b in place: y (n, out), u (n, R), b (R, out). Where y is half precision and the adapter's
    weights float32 (PEFT's default beside a half-precision model), the float32 product is added and
    rounded once to y's dtype, as PEFT adds an adapter's update."""
    if y.dtype == b.dtype:
        y.addmm_(u, b)
    else:
        y.add_(u @ b)


class StackedLora:
    """The stacked LoRA weights of the model's adapters, per LoRA layer, and the hooks that use them."""

    def __init__(self):
        self.slots: dict[tuple, int] = {}                 # (adapter name, version) -> slot
        self.capacity = 1                                 # slots in every stack (slot 0: no adapter)
        self.layers: dict[int, tuple[LoraLayer, _LayerStack | None]] = {}   # id(layer) -> (layer, stack)
        self.rows: tuple[int, ...] | None = None          # slot per row, set per forward
        self.single: int | None = None                    # the rows' one slot, when they share it
        self.ok = True                                    # False: some layer is not plain LoRA
        self._hooks: dict[int, object] = {}
        self._model_id, self._names, self._slot_of = None, frozenset(), {}
        self._rows_key, self._gathered = None, {}         # _weights per group of layers, for these rows
        self.version = 0                                  # bumped by every change of the stacks

    @torch.no_grad()
    def sync(self, model, adapters: dict[str, int]) -> bool:
        """Make the stacks hold exactly `adapters` (the model's loaded adapters: name -> version): free the
        slots of dropped ones (or of ones reloaded at another version), copy only the new ones' weights.
        False when some layer is not plain LoRA (DoRA or another variant): the caller uses PEFT's path then."""
        names = frozenset(adapters.items())
        if id(model) == self._model_id and names == self._names:
            return self.ok
        if id(model) != self._model_id:
            self.close()
            self.slots, self.capacity, self._model_id = {}, 1, id(model)
        for module in model.modules():                                                 # new LoRA layers
            if isinstance(module, LoraLayer) and id(module) not in self.layers:
                self.layers[id(module)] = (module, None)
                self._hooks[id(module)] = module.register_forward_hook(self._hook)
        layers = [layer for layer, _ in self.layers.values()]
        self.ok = all(not layer.lora_variant and not any(layer.use_dora.values()) for layer in layers)
        for name in [n for n in self.slots if n not in names]:
            slot = self.slots.pop(name)
            for _, stack in self.layers.values():
                if stack is not None:
                    stack.clear(slot)
        for name in sorted(names - set(self.slots)) if self.ok else ():      # (adapter name, version)
            used = set(self.slots.values())
            slot = next(k for k in range(1, self.capacity + 1) if k not in used)
            if slot >= self.capacity:
                self.capacity *= 2                                                      # amortised growth
                for _, stack in self.layers.values():
                    if stack is not None:
                        stack.grow(self.capacity, 0)
            self.slots[name] = slot
            for key, (layer, stack) in self.layers.items():
                if name[0] in layer.lora_A:
                    if stack is None:
                        stack = _LayerStack(layer, name[0], self.capacity)
                        self.layers[key] = (layer, stack)
                    stack.put(slot, layer, name[0])
        self._names = names
        self._slot_of = {name: slot for (name, _), slot in self.slots.items()}
        self.version += 1
        self._rows_key, self._gathered = None, {}
        return self.ok

    @contextmanager
    def rows_using(self, adapters: list[str | None], peft_off: bool = True):
        """Context: the hooked model adds to row b the LoRA update of adapters[b] (None: none), with
        PEFT's own adapters switched off (PEFT computes the base layers only); `peft_off=False` leaves
        PEFT's layers alone, for a caller that computes the base layers itself and calls `add`."""
        slots = tuple(NO_ADAPTER_SLOT if a is None else self._slot_of[a] for a in adapters)
        key = (self.version, slots)
        if key != self._rows_key:
            self._rows_key, self._gathered = key, {}
        self.single = slots[0] if len(set(slots)) == 1 else None      # one adapter: its weights, not b copies
        self.rows = None if self.single == NO_ADAPTER_SLOT else slots
        layers = [(layer, layer._disable_adapters) for layer, _ in self.layers.values()] if peft_off else []
        for layer, _ in layers:
            layer._disable_adapters = True
        try:
            yield self
        finally:
            self.rows = None
            for layer, before in layers:
                layer._disable_adapters = before

    def _hook(self, module, args, output):
        self.add((module,), args[0], (output,))
        return output

    def add(self, modules: tuple, x: torch.Tensor, outputs, whole: torch.Tensor | None = None) -> None:
        """outputs[i] (..., out_i) += the rows' LoRA update of modules[i], in place, for the input x (..., in)
        the modules share (a block's q, k, v projections, say; modules without LoRA are skipped): one
        product with their A^T side by side, then one per module with its B,

            U = X [A_1^T | A_2^T | ...],   y_i += U[:, R_i] B_i       (R_i: module i's columns of U)

        or, for rows that share one adapter and `whole` given (the outputs side by side in one tensor,
        (..., sum out_i), of which outputs[i] are the column views), one product with the B_i on the
        diagonal of one matrix: [y_1 | y_2 | ...] += U diag(B_1, B_2, ...), two operations per group.
        (The hook does this for one module under transformers' forward; crma's decoding step, step.py,
        for its groups.) Nothing outside rows_using."""
        if self.rows is None:
            return
        got = self._weights(modules)
        if got is None:
            return
        a, parts, diagonal = got      # (in, R) for one adapter, else (b, in, R); [(i, lo, hi, B)]; (R, sum out)
        if a.dim() == 2:
            u = _as(x.reshape(-1, x.shape[-1]), a.dtype) @ a                            # (n, R)
            if whole is not None and diagonal is not None:
                _add_product(whole.view(-1, whole.shape[-1]), u, diagonal)              # (n, sum out)
                return
            for i, lo, hi, b in parts:
                _add_product(outputs[i].view(-1, outputs[i].shape[-1]), u[:, lo:hi], b)  # (n, out_i)
        else:
            u = torch.bmm(_as(x.reshape(x.shape[0], -1, x.shape[-1]), a.dtype), a)      # (b, s, R)
            for i, lo, hi, b in parts:                                                  # b: (b, r_i, out_i)
                outputs[i].view(x.shape[0], -1, outputs[i].shape[-1]).add_(torch.bmm(u[..., lo:hi], b))

    def row_weights(self, modules: tuple) -> tuple[torch.Tensor, torch.Tensor] | None | bool:
        """For rows that share one adapter, its update of `modules` in the form gemv.py's kernels fold into
        a group's product: (A (R, in), D (sum out_i, R)), A = [A_1; A_2; ...] and D = diag(B_1, B_2, ...)^T
        (s_i in B_i), contiguous copies kept while the rows stay the same. None: nothing to add (no rows,
        or no LoRA on these modules); False: an update this form cannot hold (rows of several adapters,
        or an output size unknown), for `add` to apply."""
        if self.rows is None:
            return None
        if self.single is None:
            return False
        key = ("row", *(id(m) for m in modules))
        if key not in self._gathered:
            got = self._weights(modules)
            if got is not None:
                a, parts, diagonal = got                                   # (in, R), ..., (R, sum out) or None
                d = diagonal if diagonal is not None else parts[0][3] if len(modules) == 1 else None
                got = False if d is None else (a.T.contiguous(), d.T.contiguous())
            self._gathered[key] = got
        return self._gathered[key]

    def _weights(self, modules: tuple):
        """(A^T side by side, [(output index, first and last column of U, B)], the B_i on one diagonal (one
        adapter, several modules) or None) of `modules` for these rows: the one adapter's slices, else each
        row's slice gathered; kept while the rows stay the same."""
        key = tuple(id(m) for m in modules)
        if key in self._gathered:
            return self._gathered[key]
        found = [(i, self.layers[id(m)][1]) for i, m in enumerate(modules) if id(m) in self.layers]
        found = [(i, stack) for i, stack in found if stack is not None]
        got = None
        if found:
            if self.single is not None:                # one adapter: its weights, not b copies
                a_parts, b_parts = [s.a[self.single] for _, s in found], [s.b[self.single] for _, s in found]
            else:
                index = torch.tensor(self.rows, dtype=torch.long, device=found[0][1].a.device)
                a_parts = [s.a.index_select(0, index) for _, s in found]                # (b, in, r_i)
                b_parts = [s.b.index_select(0, index) for _, s in found]                # (b, r_i, out_i)
            ends = list(accumulate(p.shape[-1] for p in a_parts))
            parts = [(i, end - p.shape[-1], end, b) for (i, _), p, end, b in zip(found, a_parts, ends, b_parts,
                                                                                   strict=True)]
            grouped = self.single is not None and len(modules) > 1     # one module: its own B is the product
            got = (a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, -1), parts,
                   _diagonal(modules, parts) if grouped else None)
        self._gathered[key] = got
        return got

    def close(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self.layers.clear()
        self._model_id, self._names = None, frozenset()
