"""One decoding step of a Llama-family model (Llama, Mistral, Qwen2) in plain torch calls, without
transformers' modules: the same arithmetic as the model's own forward for one new token per row.

A decoding step is bound by the weights' GEMMs, but on a CPU the rest of transformers' forward (module
calls, hooks, PEFT's LoRA wrappers, per-call argument handling) costs several milliseconds more.
This step walks the decoder blocks itself, reading the model's own weights (no copies) and applying
the rows' LoRA updates (`StackedLora.add`) and CRMA operators (`CRMABlock.row_operators`) directly:

    h_0   = E[token]                                           (b, d)
    per block l:
      x   = rmsnorm(h) g_in
      [q | k | v] = x [Wq; Wk; Wv]^T + U [Bq | Bk | Bv]       one GEMM (packed group), LoRA rows' update
                                                                with U = x [Aq^T | Ak^T | Av^T] (lora_rows.py);
                                                                one row: one kernel for both (gemv.py)
      q, k = rope(q, pos), rope(k, pos)                         rope(x) = x cos + rotate_half(x) sin
                                                                (one call on q | k when side by side)
      K_l[:, :, T], V_l[:, :, T] = k, v                         the batch cache's preallocated columns
      a   = softmax(q K_l^T / sqrt(hd) + mask) V_l              grouped-query: q heads share kv heads
      h   = h + a Wo^T + do
      x   = rmsnorm(h) g_post
      [g | u] = x [Wg; Wu]^T + dg|u                             one GEMM (packed group)
      h   = h + (silu(g) * u) Wd^T + dd
      h   = h + (alpha_b W_b)(M_b R_b) h                        CRMA, the row's backbone version (one row:
                                                                in the kernel of down, gemv.py)
    logits = rmsnorm(h) g_out W_lm^T

The projections of a group are one GEMM when PackedLinears packed them together (`fused_groups`),
else one GEMM each. Attention is written out (two matmuls and a softmax over the mask added once per
step): for one query per row it costs less than torch's fused attention from three rows on and about
the same on one (benchmarks/decode_floor.py). In float32 it reads the T + 1 columns in use; in
bfloat16 (or float16) the batch cache's whole preallocated buffers, the columns past T masked: oneDNN,
which computes those matmuls, builds a new kernel for every new shape, and the buffers' shape changes
only when they double, while T changes at every step (decode_floor.py measures both ways).

`supports(model)` says whether a model has this structure; MixedForward uses the step for decoding
steps of such models and transformers' forward for everything else (prefills, other families, PEFT's
reference path). The tests check its logits against transformers' forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from ..method.layer import delta_rows
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


def _block_groups(block: nn.Module) -> tuple[tuple[nn.Module, ...], tuple[nn.Module, ...]]:
    """A decoder block's projections that read one input: (q, k, v) and (gate, up), LoRA-wrapped or not."""
    attn, mlp = block.self_attn, block.mlp
    return (attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)


def fused_groups(model: nn.Module) -> list[tuple[nn.Linear, ...]]:
    """The base linear layers of every block that read one input (`_block_groups`), for PackedLinears."""
    return [tuple(_linear_of(m) for m in group)
            for block in base_model(model).model.layers for group in _block_groups(block)]


def rms_norm(h: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """rmsnorm(h) g = h / sqrt(mean(h^2) + eps) * g, in float32 and cast back before the product with g,
    as LlamaRMSNorm (written out so that bfloat16 rounds where it does; torch's F.rms_norm multiplies by g
    in float32)."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(h.dtype)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """s = [-sin_1 | sin_2] (the halves of sin), so that rotate_half(x) sin = roll(x, hd / 2) s."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), -1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin_s: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin = x cos + roll(x, hd / 2) s, rotate_half([x1, x2]) = [-x2, x1], s =
    signed_sin(sin): x (b, heads, hd), cos/s (b, 1, hd)."""
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, -1), sin_s)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
              scale: float) -> torch.Tensor:
    """softmax(q K^T scale + bias) V for one query per row, grouped: q (b, KV, G, hd) (G query heads per
    kv head), keys/values (b, KV, T, hd), bias (b, 1, 1, T) (0 or -inf) -> (b, KV, G, hd). The softmax
    in float32, as transformers' eager attention."""
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(scale).add_(bias)          # (b, KV, G, T)
    return torch.matmul(torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype), values)


class _Projections:
    """Linear layers that read one input (with or without LoRA), that input's RMSNorm first where `norm`
    is given: their outputs for x, plus the rows' LoRA updates; one GEMM when PackedLinears packed them
    as a group. One row takes gemv.py's kernel for the group with the norm and the row's LoRA update
    folded in, where `lora` hands it over (`StackedLora.row_weights`), and the block's last projection
    (`end`) with the residual and the row's CRMA operator too."""

    def __init__(self, modules: tuple[nn.Module, ...], linears=None, lora=None, crma: torch.dtype | None = None,
                 norm: nn.Module | None = None):
        self.modules, self.base, self.norm = modules, tuple(_linear_of(m) for m in modules), norm
        self.packed = linears.group(self.base) if linears is not None else None
        self.row = linears.row(self.base) if linears is not None else None
        self.sizes = [getattr(m, "out_features", None) for m in self.base]
        self._norm = None if norm is None else (norm.weight.detach(), float(norm.variance_epsilon))
        # with and without CRMA operators (True, False): the update and operators last fitted; kernel, arguments
        self._fitted: dict[bool, tuple] = {}
        adapters = [a.weight.dtype for m in modules if isinstance(m, LoraLayer) for a in m.lora_A.values()]
        lora_dtype = adapters[0] if lora is not None and adapters else None
        eps = None if norm is None else self._norm[1]
        if self.row is not None:                       # compiled with the step, not at the first token
            for variant in {(eps, lora_dtype, None), (eps, lora_dtype, crma), (eps, None, crma)} - {(None, None, None)}:
                self.row.variant(*variant)

    def _kernel(self, x: torch.Tensor, lora, ops: tuple | None = None, h: torch.Tensor | None = None):
        """(gemv.py's kernel, its arguments before and after h) for one row x with the norm, the row's LoRA
        update and CRMA operators `ops` (with h), or None where it does not apply; fitted once per update."""
        if self.row is None or x.shape[0] != 1 or x.dtype != self.row.dtype:
            return None
        update = lora.row_weights(self.modules) if lora is not None else None     # A (R, in), D (sum out, R)
        if update is False or (update is None and ops is None and self.norm is None):
            return None                                                           # (False: `add` applies it)
        fitted = self._fitted.get(ops is not None)
        if fitted is None or update is not fitted[0] or ops is not fitted[1]:       # new weights: checked once
            pq = () if ops is None else (ops[0][0].T.contiguous(), ops[1][0].T.contiguous())   # (n, d), (d, n)
            kernel = self.row.fitting(self._norm, update, None if ops is None else (h, *pq))
            before = (*self.row.params, *(() if self.norm is None else self._norm[:1]), *(update or ()))
            fitted = self._fitted[ops is not None] = (update, ops, kernel, before, pq)
        kernel, before, after = fitted[2:]
        return None if kernel is None else (kernel, before, after)

    def __call__(self, x: torch.Tensor, lora) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(the outputs side by side (b, sum out_i), or None when they are separate tensors; the outputs)."""
        fused = self._kernel(x, lora)
        if fused is not None:
            whole = fused[0](x, *fused[1])                                            # (1, sum out_i)
            return whole, list(whole.split(self.sizes, -1)) if len(self.sizes) > 1 else [whole]
        if self.norm is not None:
            x = rms_norm(x, self.norm)
        if self.packed is not None:
            whole = self.packed.packed(x)                                             # (b, sum out_i)
            ys = list(whole.split(self.sizes, -1))
        else:
            ys = [m.forward(x) for m in self.base]
            whole = ys[0] if len(ys) == 1 else None
        if lora is not None:
            lora.add(self.modules, x, ys, whole)
        return whole, ys

    def end(self, x: torch.Tensor, h: torch.Tensor, lora, block: nn.Module | None) -> torch.Tensor:
        """The block's end for its last projection (one layer): z = h + y, then z + CRMA(z) with the CRMA
        block's operators per row (`block`, None: no backbone), y the layer's output for x."""
        ops = block.row_operators if block is not None else None
        fused = self._kernel(x, lora, ops, h) if ops is not None else None
        if fused is not None:
            return fused[0](x, *fused[1], h, *fused[2])                               # (1, d)
        h = h + self(x, lora)[0]                                                      # (b, d)
        if block is None:
            return h
        return block(h) if ops is None else h + delta_rows(h, *ops)                   # h + alpha W M R h per row


class DecodeStep:
    """The decoding step of one model; `lora` is MixedForward's StackedLora (its rows set per call),
    `linears` its PackedLinears (groups packed with `fused_groups`) or None."""

    def __init__(self, model: nn.Module, lora=None, backbone=None, linears=None):
        base = base_model(model)
        inner = base.model
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.lm_head = base.get_output_embeddings()
        self.blocks = []
        crma = torch.float32 if backbone is not None else None          # VersionStack's operators are float32
        for block in inner.layers:
            qkv, gate_up = _block_groups(block)
            self.blocks.append((_Projections(qkv, linears, lora, norm=block.input_layernorm),
                                _Projections((block.self_attn.o_proj,), linears, lora),
                                _Projections(gate_up, linears, lora, norm=block.post_attention_layernorm),
                                _Projections((block.mlp.down_proj,), linears, lora, crma)))
        attn = inner.layers[0].self_attn
        self.heads, self.kv_heads = base.config.num_attention_heads, base.config.num_key_value_heads
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        self.lora, self.backbone = lora, backbone

    def __call__(self, input_ids: torch.Tensor, cache, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits (b, vocab) for input_ids (b, 1) at position_ids (b, 1), attending over
        attention_mask (b, T + 1) (1: a real token); writes the rows' keys and values into `cache`
        (the batch cache's SlotLayers) at column T."""
        b, lora = input_ids.shape[0], self.lora
        h = self.embed(input_ids)[:, 0]                                               # (b, d)
        cos, sin = self.rotary(h, position_ids)                                       # (b, 1, hd)
        sin = signed_sin(sin)
        used = attention_mask.shape[1]                                                # T + 1
        columns = used if h.dtype == torch.float32 else cache.layers[0].keys.shape[2]  # T + 1, or the capacity
        bias = torch.full((b, columns), float("-inf"), dtype=h.dtype, device=h.device)
        bias[:, :used].masked_fill_(attention_mask != 0, 0.0)
        bias = bias[:, None, None, :]                                                 # (b, 1, 1, columns)
        group, hd = self.heads // self.kv_heads, self.head_dim
        crma = self.backbone.crma_blocks if self.backbone is not None and self.backbone.enabled else None
        for i, (qkv, o_proj, gate_up, down) in enumerate(self.blocks):
            whole, (q, k, v) = qkv(h, lora)                            # rmsnorm(h) g_in: (b, H hd), (b, KV hd) x 2
            if whole is not None:                                                     # q | k side by side
                qk = rope(whole[:, :(self.heads + self.kv_heads) * hd].view(b, -1, hd), cos, sin)
                q, k = qk[:, :self.heads], qk[:, self.heads:]                         # (b, H, hd), (b, KV, hd)
            else:
                q = rope(q.view(b, self.heads, hd), cos, sin)                         # (b, H, hd)
                k = rope(k.view(b, self.kv_heads, hd), cos, sin)                      # (b, KV, hd)
            keys, values = cache.layers[i].update(k[:, :, None], v.view(b, self.kv_heads, 1, hd))
            if columns > used:                                                        # the whole buffers
                keys, values = cache.layers[i].keys[:b], cache.layers[i].values[:b]
            a = attention(q.view(b, self.kv_heads, group, hd), keys, values, bias, self.scale)
            h = h + o_proj(a.reshape(b, self.heads * hd), lora)[0]                    # (b, d)
            g, u = gate_up(h, lora)[1]                                 # rmsnorm(h) g_post: (b, I) x 2
            h = down.end(F.silu(g) * u, h, lora, crma[i] if crma is not None else None)
        return self.lm_head.forward(rms_norm(h, self.norm))                           # (b, vocab)
