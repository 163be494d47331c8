"""One decoding step of a Llama-family model (Llama, Mistral, Qwen2) in plain torch calls, without
transformers' modules: the same arithmetic as the model's own forward for one new token per row.

A decoding step is bound by the weights' GEMMs, but on a CPU the rest of transformers' forward (module
calls, hooks, PEFT's LoRA wrappers, per-call argument handling) costs several milliseconds more.
This step walks the decoder blocks itself, reading the model's own weights (no copies) and applying
the rows' LoRA updates (`StackedLora.update`) and CRMA operators (`CRMABlock.row_operators`) directly:

    h_0   = E[token]                                           (b, d)
    per block l:
      x   = rmsnorm(h) g_in
      q, k, v = x Wq^T + dq, x Wk^T + dk, x Wv^T + dv           LoRA rows' updates d = (x A_R^T) B_R
      q, k = rope(q, pos), rope(k, pos)                         rope(x) = x cos + rotate_half(x) sin
      K_l[:, :, T], V_l[:, :, T] = k, v                         the batch cache's preallocated columns
      a   = softmax(q K_l^T / sqrt(hd) + mask) V_l              grouped-query: q heads share kv heads
      h   = h + a Wo^T + do
      x   = rmsnorm(h) g_post
      h   = h + (silu(x Wg^T + dg) * (x Wu^T + du)) Wd^T + dd
      h   = h + alpha_b W_b M_b R_b h                           CRMA, the row's backbone version
    logits = rmsnorm(h) g_out W_lm^T

`supports(model)` says whether a model has this structure; MixedForward uses the step for decoding
steps of such models and transformers' forward for everything else (prefills, other families, PEFT's
reference path). The tests check its logits against transformers' forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from ..method.models import base_model

FAMILIES = ("llama", "mistral", "qwen2")
_PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def supports(model: nn.Module) -> bool:
    """Whether `model` is a Llama-family decoder this step computes exactly."""
    base = base_model(model)
    cfg = base.config
    inner = getattr(base, "model", None)
    if cfg.model_type not in FAMILIES or getattr(cfg, "hidden_act", None) != "silu" or inner is None:
        return False
    if getattr(cfg, "pretraining_tp", 1) != 1 or not all(hasattr(inner, a) for a in ("embed_tokens", "norm",
                                                                                       "rotary_emb", "layers")):
        return False
    return all(isinstance(_linear_of(getattr(getattr(block, part), name)), nn.Linear)
               for block in inner.layers for part, name in _PROJECTIONS)


def _linear_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def rms_norm(h: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """rmsnorm(h) g = h / sqrt(mean(h^2) + eps) * g, in float32 and cast back first, as LlamaRMSNorm
    (written out: torch's F.rms_norm is slower here on one row)."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(h.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin, rotate_half([x1, x2]) = [-x2, x1]: x (b, heads, hd), cos/sin (b, 1, hd)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class DecodeStep:
    """The decoding step of one model; `lora` is MixedForward's StackedLora (its rows set per call)."""

    def __init__(self, model: nn.Module, lora=None, backbone=None):
        base = base_model(model)
        inner = base.model
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.lm_head = base.get_output_embeddings()
        self.blocks = []
        for block in inner.layers:
            attn = block.self_attn
            self.blocks.append((block.input_layernorm, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj,
                                block.post_attention_layernorm, block.mlp.gate_proj, block.mlp.up_proj,
                                block.mlp.down_proj))
        attn = inner.layers[0].self_attn
        self.heads, self.kv_heads = base.config.num_attention_heads, base.config.num_key_value_heads
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        self.lora, self.backbone = lora, backbone

    def _linear(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """module's base linear layer on x (its own forward: packed or not), plus the rows' LoRA update."""
        if isinstance(module, LoraLayer):
            y = module.base_layer.forward(x)
            return y if self.lora is None else self.lora.update(module, x, y)
        return module.forward(x)

    def __call__(self, input_ids: torch.Tensor, cache, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits (b, vocab) for input_ids (b, 1) at position_ids (b, 1), attending over
        attention_mask (b, T + 1) (1: a real token); writes the rows' keys and values into `cache`
        (the batch cache's SlotLayers) at column T."""
        b = input_ids.shape[0]
        h = self.embed(input_ids)[:, 0]                                               # (b, d)
        cos, sin = self.rotary(h, position_ids)                                       # (b, 1, hd)
        mask = attention_mask.bool()[:, None, None, :]                                # (b, 1, 1, T + 1)
        group, hd = self.heads // self.kv_heads, self.head_dim
        crma = self.backbone.crma_blocks if self.backbone is not None and self.backbone.enabled else None
        for i, (norm_in, q_p, k_p, v_p, o_p, norm_post, gate_p, up_p, down_p) in enumerate(self.blocks):
            x = rms_norm(h, norm_in)                                                  # (b, d)
            q = rope(self._linear(q_p, x).view(b, self.heads, hd), cos, sin)          # (b, H, hd)
            k = rope(self._linear(k_p, x).view(b, self.kv_heads, hd), cos, sin)       # (b, KV, hd)
            v = self._linear(v_p, x).view(b, self.kv_heads, hd)                       # (b, KV, hd)
            keys, values = cache.layers[i].update(k[:, :, None], v[:, :, None])       # (b, KV, T + 1, hd)
            a = F.scaled_dot_product_attention(q.view(b, self.kv_heads, group, hd), keys, values,
                                               attn_mask=mask, scale=self.scale)     # (b, KV, G, hd)
            h = h + self._linear(o_p, a.reshape(b, self.heads * hd))                  # (b, d)
            x = rms_norm(h, norm_post)
            h = h + self._linear(down_p, F.silu(self._linear(gate_p, x)) * self._linear(up_p, x))
            if crma is not None:
                h = crma[i](h)                                                        # h + alpha W M R h per row
        return self.lm_head.forward(rms_norm(h, self.norm))                           # (b, vocab)
