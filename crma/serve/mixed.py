"""One forward pass over batch rows that each have their own domain adapter and backbone version.

LoRA part (`lora_mixing`):
- `gather` (the default): each row's slice of the stacked adapter weights, two batched matmuls per
  LoRA layer whatever the adapter mix (lora_rows.py); the stacks follow adapter loads and unloads incrementally.
- `peft`: PEFT's own mixed-adapter inference, kept as the reference the tests compare against. Every
  LoRA layer's forward takes `adapter_names` (one name per row, "__base__" for none) and loops over the
  adapters present; a batch whose rows all use one adapter takes PEFT's ordinary path with that adapter
  active. One persistent pre-hook per LoRA layer passes the step's names (PEFT's own
  `model(..., adapter_names=...)` registers and removes a hook on every LoRA layer at every call).
A model whose LoRA layers are not plain LoRA (DoRA or another variant) always takes PEFT's path.

Decoding steps (one new token per row in the batch cache) of Llama-family models run in crma's own
step (step.py: the same arithmetic without transformers' modules) unless `decode_step` is off;
prefills, other families and PEFT's path run transformers' forward.

Base layers: float32 linear layers on the CPU take `PackedLinears` (linear.py: oneDNN GEMMs on weights
packed once; `packed_linears="float16"`: FBGEMM GEMMs on float16 copies of the weights) unless
`packed_linears` is "off"; with the decoding step, each block's q, k, v projections
and its gate and up projections are packed as one GEMM each (PackedGroup), for decoding steps and
prefills alike.

CRMA part: `CRMABackbone.per_row` gathers, for every row, the operators of its backbone version
from a stack precomputed once per set of versions (no Sinkhorn or QR per step).
"""
from __future__ import annotations

from contextlib import ExitStack

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from .batch import SlotLayer
from .config import LORA_MIXING, PACKED_LINEARS
from .linear import PackedLinears
from .lora_rows import StackedLora
from .step import DecodeStep, fused_groups, supports

NO_ADAPTER = "__base__"


def adapter_linears(model) -> set[int]:
    """The ids of PEFT's own LoRA A and B layers: adapter weights, which PackedLinears leaves alone."""
    return {id(m) for layer in model.modules() if isinstance(layer, LoraLayer)
            for side in (layer.lora_A, layer.lora_B) for m in side.values()}


class MixedForward:
    """Runs `live.model` on rows routed to (adapter name or None, backbone version) each."""

    def __init__(self, live, registry, lora_mixing: str = "gather", packed_linears: str = "on",
                 decode_step: bool = True, row_gemv: bool = True):
        if lora_mixing not in LORA_MIXING:
            raise ValueError(f"lora_mixing must be one of {LORA_MIXING}, got {lora_mixing!r}")
        if packed_linears not in PACKED_LINEARS:
            raise ValueError(f"packed_linears must be one of {PACKED_LINEARS}, got {packed_linears!r}")
        self.live, self.registry, self.lora_mixing = live, registry, lora_mixing
        self.stacked = StackedLora()
        self.packed = (PackedLinears(half=packed_linears == "float16", row_gemv=row_gemv)
                       if packed_linears != "off" else None)
        self.decode_step = decode_step
        self._step_key, self._step = None, None
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

    def _peft_rows(self, model, adapters: list[str | None]) -> None:
        """PEFT's reference path for the next forward."""
        self._hook_layers()
        names = set(adapters)
        if len(names) == 1 and None not in names:          # one adapter for every row: PEFT's plain path
            name = names.pop()
            if model.active_adapter != name:
                model.set_adapter(name, inference_mode=True)
        else:
            self._names = [a or NO_ADAPTER for a in adapters]

    def _decode_step(self, model) -> DecodeStep | None:
        """The model's DecodeStep (built again when the model, its adapters or the backbone changed), or
        None for a model it does not support."""
        key = (id(model), tuple(sorted(self.live.adapters.items())), id(self.live.backbone))
        if key != self._step_key:
            lora = self.stacked if self.lora_mixing == "gather" else None
            self._step = DecodeStep(model, lora, self.live.backbone, self.packed) if supports(model) else None
            self._step_key = key
        return self._step

    def _groups(self, model) -> list:
        """The linear layers PackedLinears packs together: those crma's decoding step reads as groups."""
        return fused_groups(model) if self.decode_step and supports(model) else []

    def __call__(self, input_ids: torch.Tensor, routes: list, cache, attention_mask=None,
                 position_ids=None, all_positions: bool = False) -> torch.Tensor:
        """Logits of the last position, (rows, vocab), or of every position, (rows, s, vocab); `cache` is
        updated in place."""
        model = self.live.model
        adapters = [r.adapter for r in routes]
        missing = {a for a in adapters if a is not None} - set(self.live.adapters)
        if missing:                  # PEFT would silently skip an adapter it does not have
            raise RuntimeError(f"adapters not loaded: {sorted(missing)}")
        backbone, stack = self.live.backbone, self.registry.stack
        self.prepare()
        step = None
        if (self.decode_step and input_ids.shape[1] == 1 and not all_positions and attention_mask is not None
                and position_ids is not None and cache is not None and isinstance(cache.layers[0], SlotLayer)):
            step = self._step                                # prepare() built it: one new token per row
        with ExitStack() as scope:
            if isinstance(model, PeftModel):
                if self.lora_mixing == "gather" and self.stacked.sync(model, self.live.adapters):
                    scope.enter_context(self.stacked.rows_using(adapters, peft_off=step is None))
                else:
                    self._peft_rows(model, adapters)
                    step = None
            if backbone is not None:
                scope.enter_context(backbone.per_row(stack, stack.rows([r.backbone_version for r in routes])))
            if step is not None:
                return step(input_ids, cache, attention_mask, position_ids)
            try:
                out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            cache=cache, use_cache=True, logits_to_keep=0 if all_positions else 1)
            finally:
                self._names = None
        return out.logits if all_positions else out.logits[:, -1, :]

    def prepare(self) -> None:
        """Pack the model's linear layers and build its decoding step (compiling their one-row kernels)
        unless done for this model and its adapters."""
        if self.packed is not None:
            self.packed.install(self.live.model, self._groups, adapter_linears)
        if self.decode_step:
            self._decode_step(self.live.model)

    def close(self) -> None:
        self.stacked.close()
        if self.packed is not None:
            self.packed.remove()
        for handle in self._hooked.values():
            handle.remove()
        self._hooked.clear()
        self._scanned_for = None
