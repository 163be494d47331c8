"""One forward pass over batch rows that each have their own domain adapter and backbone version.

LoRA part: PEFT's mixed-adapter inference. Every LoRA layer's forward takes `adapter_names` (one
name per row, "__base__" for none) and adds each adapter's update to its own rows only; a batch
whose rows all use one adapter takes PEFT's ordinary path with that adapter active. PEFT's own
`model(..., adapter_names=...)` walks the whole module tree and registers and removes a pre-hook on
every LoRA layer at every call (~5000 modules on SmolLM2 with five adapters); here one persistent
pre-hook per LoRA layer passes the current step's names instead, so a decoding step pays nothing.

CRMA part: `CRMABackbone.per_row` gathers, for every row, the operators of its backbone version
from a stack precomputed once per set of versions (no Sinkhorn or QR per step).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from .lora_rows import StackedLora

NO_ADAPTER = "__base__"
LORA_MIXING = ("peft", "gather")


class MixedForward:
    """Runs `live.model` on rows routed to (adapter name or None, backbone version) each."""

    def __init__(self, live, registry, lora_mixing: str = "peft"):
        if lora_mixing not in LORA_MIXING:
            raise ValueError(f"lora_mixing must be one of {LORA_MIXING}, got {lora_mixing!r}")
        self.live, self.registry, self.lora_mixing = live, registry, lora_mixing
        self.stacked = StackedLora()
        self._names: list[str] | None = None     # what the pre-hooks pass; None outside our forward
        self._hooked: dict[int, object] = {}     # id(LoRA layer) -> hook handle
        self._scanned_for: tuple | None = None

    def _hook_layers(self) -> None:
        """Give every LoRA layer the persistent pre-hook (again after adapters were loaded)."""
        key = (id(self.live.model), tuple(sorted(self.live.adapters)))
        if key == self._scanned_for:
            return
        for module in self.live.model.modules():
            if isinstance(module, LoraLayer) and id(module) not in self._hooked:
                self._hooked[id(module)] = module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        self._scanned_for = key

    def _pre_hook(self, module, args, kwargs):
        if self._names is not None:
            kwargs["adapter_names"] = self._names
        return args, kwargs

    def __call__(self, input_ids: torch.Tensor, routes: list, cache, attention_mask=None,
                 position_ids=None, all_positions: bool = False) -> torch.Tensor:
        """Logits of the last position, (rows, vocab), or of every position, (rows, s, vocab); `cache` is
        updated in place."""
        model = self.live.model
        peft = isinstance(model, PeftModel)
        missing = {r.adapter for r in routes if r.adapter is not None} - set(self.live.adapters)
        if missing:                  # PEFT would silently skip an adapter it does not have
            raise RuntimeError(f"adapters not loaded: {sorted(missing)}")
        if peft:
            self._hook_layers()
            names = {r.adapter for r in routes}
            if len(names) == 1 and None not in names:      # one adapter for every row: PEFT's plain path,
                name = names.pop()                         # the same arithmetic without per-row indexing
                if model.active_adapter != name:           # (~7% of a SmolLM2 step at batch 1)
                    model.set_adapter(name, inference_mode=True)
            elif self.lora_mixing == "gather" and self.stacked.build(model, sorted(self.live.adapters)):
                self.stacked.set_rows([r.adapter for r in routes])
                self._names = [NO_ADAPTER] * len(routes)   # PEFT: the base layers; the hooks: each row's LoRA
            else:
                self._names = [r.adapter or NO_ADAPTER for r in routes]
        backbone, stack = self.live.backbone, self.registry.stack
        rows = nullcontext()
        if backbone is not None:
            rows = backbone.per_row(stack, stack.rows([r.backbone_version for r in routes]))
        try:
            with rows:
                out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            cache=cache, use_cache=True, logits_to_keep=0 if all_positions else 1)
        finally:
            self._names = None
            self.stacked.set_rows(None)
        return out.logits if all_positions else out.logits[:, -1, :]

    def close(self) -> None:
        self.stacked.close()
        for handle in self._hooked.values():
            handle.remove()
        self._hooked.clear()
        self._scanned_for = None
