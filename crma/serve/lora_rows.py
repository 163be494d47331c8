"""Opt-in (`--lora-mixing gather`): per-row LoRA by gathering stacked adapter weights.

PEFT's mixed-adapter inference loops over the adapters present in a batch inside every LoRA layer
(gather the rows, two small matmuls, scatter back): on SmolLM2 with five adapters in a 16-row batch
that is ~100 ms of a ~330 ms decoding step. Here every LoRA layer keeps its adapters' weights
stacked, A^T (V, in, r) and (s B)^T (V, r, out), padded to the largest rank with zeros, and a row's
update is `x_b A_b^T (s_b B_b)^T`: two batched matmuls per layer whatever the number of adapters.
PEFT computes the base layer (every row named "__base__"); a forward hook adds the rows' updates.
The default (`peft`) is PEFT's own adapter_names path.
"""
from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer


class StackedLora:
    """Stacked LoRA weights of the model's adapters, per LoRA layer, and the hooks that use them."""

    def __init__(self):
        self.names: tuple[str, ...] = ()
        self.stacks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows: torch.Tensor | None = None            # (b,) stack position per row, set per forward
        self._hooks: dict[int, object] = {}
        self._key = None
        self.ok = False
        self._rows_key, self._gathered = None, {}              # gathered (A, B) per layer for these rows

    @torch.no_grad()
    def build(self, model, names: list[str]) -> bool:
        """(Re)stack `names` (in this order) on every LoRA layer when the loaded adapters changed.
        False when some layer is not plain LoRA (DoRA or another variant): use PEFT's path then."""
        key = (id(model), tuple(names))
        if key == self._key:
            return self.ok
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self.ok = all(not layer.lora_variant and not any(layer.use_dora.values()) for layer in layers)
        stacks = {}
        for layer in layers if self.ok else []:
            if id(layer) not in self._hooks:
                self._hooks[id(layer)] = layer.register_forward_hook(self._hook)
            have = [n for n in names if n in layer.lora_A]
            if not have:
                continue
            ref = layer.lora_A[have[0]].weight
            r = max(layer.lora_A[n].weight.shape[0] for n in have)
            d_in, d_out = ref.shape[1], layer.lora_B[have[0]].weight.shape[0]
            a = torch.zeros(len(names) + 1, d_in, r, dtype=ref.dtype, device=ref.device)   # last: no adapter
            b = torch.zeros(len(names) + 1, r, d_out, dtype=ref.dtype, device=ref.device)
            for i, n in enumerate(names):
                if n in layer.lora_A:
                    wa, wb = layer.lora_A[n].weight, layer.lora_B[n].weight                 # (r, in), (out, r)
                    a[i, :, : wa.shape[0]] = wa.T
                    b[i, : wb.shape[1], :] = (wb * layer.scaling[n]).T
            stacks[id(layer)] = (a, b)
        self.names, self.stacks, self._key = tuple(names), stacks, key
        return self.ok

    def set_rows(self, adapters: list[str | None] | None) -> None:
        """The rows' adapters for the next forward (None: hooks off). Gathered weights are kept while
        the rows stay the same (consecutive decoding steps)."""
        if adapters is None:
            self.rows = None
            return
        pos = {n: i for i, n in enumerate(self.names)}
        key = (self.names, tuple(pos[a] if a is not None else len(self.names) for a in adapters))
        if key != self._rows_key:
            self._rows_key, self._gathered = key, {}
        self.rows = torch.tensor(key[1], dtype=torch.long)

    def _hook(self, module, args, output):
        if self.rows is None or id(module) not in self.stacks:
            return output
        x = args[0]
        pair = self._gathered.get(id(module))
        if pair is None:
            a, b = self.stacks[id(module)]
            rows = self.rows.to(a.device)
            pair = self._gathered[id(module)] = (a.index_select(0, rows), b.index_select(0, rows))
        shape = x.shape
        flat = x.reshape(shape[0], -1, shape[-1]).to(pair[0].dtype)                        # (b, s, in)
        delta = torch.bmm(torch.bmm(flat, pair[0]), pair[1])                               # (b, s, out)
        return output + delta.reshape(*shape[:-1], delta.shape[-1]).to(output.dtype)

    def close(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._key = None
