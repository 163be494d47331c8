"""GPU memory of crma training at 7B-9B scale, computed from parameter counts (nothing is measured).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale_memory.py
    -> prints markdown tables; writes benchmarks/results/scale/memory.json and memory.md

For Llama-3-8B, Mistral-7B-v0.1 and Gemma-2-9B (and SmolLM2-135M as a sanity row) the script builds the
transformers config with the published hyperparameters below and instantiates the model on the meta
device, so the parameters are counted exactly without allocating any weights, then checks each total
against the published one. From the counts:

- base weights: bf16 = 2 bytes/param. NF4 (--load-in-4bit): the linear layers inside the decoder blocks
  take 0.5 byte/param + one fp32 absmax per 64 params (4/64 byte/param, no double quantization);
  embeddings, lm_head and norms stay bf16 (bitsandbytes quantizes nn.Linear only, transformers keeps
  lm_head unquantized). With double quantization (crma's --load-in-4bit turns it on) the absmax is 8-bit
  per 64 params plus one fp32 per 256 blocks: 1/64 + 4/(64*256) byte/param; shown beside, while the
  totals keep the plain (larger) figure.
- CRMA backbone (docs/method.md section 2): per decoder block n*n (Theta) + 1 (gate) + 2*d*n (read, write)
  params, in fp32. A saved backbone version is those params in fp32 safetensors (4 bytes/param);
  training adds params + grads + AdamW's two moments, all fp32 (16 bytes/param).
- LoRA adapter, r=8 on q,k,v,o,gate,up,down: r*(in+out) params per linear; fp32 (PEFT upcasts adapter
  weights on a bf16 base): file 4 bytes/param, training 16 bytes/param.
- activations: a rough ESTIMATE only (bf16, per token), following Korthikanti et al. 2022 "Reducing
  Activation Recomputation in Large Transformer Models": without checkpointing
  layers * hidden * (34 + 5*heads*seq/hidden) bytes; with full checkpointing 2*hidden*layers bytes
  (each block's bf16 input) plus one block's activations (recomputed in backward). The formula was
  derived for a GPT block (4h GELU MLP, eager attention); SwiGLU MLPs store somewhat more, fused
  attention (SDPA/flash) does not store the 5*heads*seq/hidden term. Plus the logits, which
  checkpointing does not reduce: ~16 bytes per vocab entry per token (bf16 logits, fp32 copy for the
  loss, fp32 log-softmax, fp32 gradient). Two crma-specific terms per token and block are added: PEFT
  casts each targeted linear's bf16 input to fp32 for the fp32 LoRA weights and keeps that copy for
  backward (4 bytes * the summed in_features of the 7 linears, counted from the model), and CRMA keeps
  ~8*hidden bytes (fp32 copies of h and of the update). With checkpointing they count for one block.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

warnings.filterwarnings("ignore")
import transformers as tf  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "scale"
LORA_R = 8
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STREAMS = (4, 16)                       # CRMA n_streams: default, and the n=16 ablation
SEQ, MICRO_BATCHES, EVAL_BATCH = 512, (1, 8), 8   # paper protocol: max_len 512, eval_batch_size 8
CARDS_GIB = (24, 40, 80)
LOGIT_BYTES = 16                        # per vocab entry per token, training (see docstring)
EVAL_LOGIT_BYTES = 10                   # forward only: bf16 logits, fp32 copy, fp32 log-softmax
GB, GIB, MB = 1e9, 2**30, 1e6

# name, hub id, config, published total (model card / safetensors index)
MODELS = [
    ("Llama-3-8B", "meta-llama/Meta-Llama-3-8B", lambda: tf.LlamaConfig(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False), 8_030_261_248),
    ("Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1", lambda: tf.MistralConfig(
        hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False), 7_241_732_096),
    ("Gemma-2-9B", "google/gemma-2-9b", lambda: tf.Gemma2Config(
        hidden_size=3584, num_hidden_layers=42, intermediate_size=14336, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, vocab_size=256000,
        tie_word_embeddings=True), 9_241_705_984),
    ("SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M", lambda: tf.LlamaConfig(
        hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True), 134_515_008),
]


def crma_params(d: int, layers: int, n: int) -> int:
    return layers * (n * n + 1 + 2 * d * n)


def crma_params_from_class(d: int, layers: int, n: int) -> int | None:
    """The same count from the project's CRMABackbone (random init, CPU); None if crma cannot be imported."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from crma.config import CRMAConfig
        from crma.method.backbone import CRMABackbone
        bb = CRMABackbone(CRMAConfig(n_streams=n, read_init="random"), d, layers, base_fingerprint={})
        return sum(p.numel() for p in bb.parameters())
    except Exception as exc:  # noqa: BLE001 -- a cross-check only
        print(f"  (CRMABackbone cross-check skipped: {type(exc).__name__}: {exc})")
        return None


def activations(cfg, seq: int, batch: int, lora_inputs: int) -> dict:
    """Rough activation bytes of one micro-batch (estimate, see docstring). lora_inputs: the summed
    in_features of one block's LoRA-targeted linears (PEFT keeps an fp32 copy of each input)."""
    h, L, a, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size
    block = h * (34 + 5 * a * seq / h)                      # bf16 block activations, bytes per token
    extra = 4 * lora_inputs + 8 * h                         # fp32 LoRA inputs + CRMA, bytes per token
    tokens = seq * batch
    logits = tokens * v * LOGIT_BYTES
    return {"per_token_per_layer_block": block, "per_token_per_layer_lora_crma": extra,
            "no_checkpointing": tokens * L * (block + extra) + logits,
            "checkpointing": tokens * (2 * h * L + block + extra) + logits,
            "logits": logits}


def analyse(name: str, hub: str, make_cfg, published: int) -> dict:
    cfg = make_cfg()
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())      # tied embeddings counted once
    layers = model.model.layers
    block_linear = sum(m.weight.numel() for m in layers.modules() if isinstance(m, nn.Linear))
    lora = sum(LORA_R * (m.in_features + m.out_features) for n_, m in layers.named_modules()
               if isinstance(m, nn.Linear) and n_.rsplit(".", 1)[-1] in LORA_TARGETS)
    lora_inputs = sum(m.in_features for n_, m in layers[0].named_modules()
                      if isinstance(m, nn.Linear) and n_.rsplit(".", 1)[-1] in LORA_TARGETS)
    n_lora_linears = sum(1 for n_, m in layers.named_modules()
                         if isinstance(m, nn.Linear) and n_.rsplit(".", 1)[-1] in LORA_TARGETS)
    assert n_lora_linears == len(LORA_TARGETS) * cfg.num_hidden_layers, (name, n_lora_linears)
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    rel = abs(total - published) / published
    ok = rel < 1e-3
    print(f"check {name}: counted {total:,} params, published {published:,} "
          f"({100 * rel:.4f}% off) -> {'OK' if ok else 'MISMATCH'}")
    crma = {}
    for n in STREAMS:
        p = crma_params(d, L, n)
        other = crma_params_from_class(d, L, n)
        if other is not None and other != p:
            print(f"  MISMATCH: CRMABackbone has {other:,} params, formula {p:,} (n={n})")
        crma[n] = {"params": p, "version_file_bytes": 4 * p, "training_bytes": 16 * p,
                   "class_count": other}
    nf4 = block_linear * (0.5 + 4 / 64) + (total - block_linear) * 2
    nf4_dq = block_linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + (total - block_linear) * 2
    act = {mb: activations(cfg, SEQ, mb, lora_inputs) for mb in MICRO_BATCHES}
    base_bf16 = 2 * total
    if all(crma[n]["class_count"] == crma[n]["params"] for n in STREAMS):
        print(f"  CRMA counts match crma.method.backbone.CRMABackbone (n = {', '.join(map(str, STREAMS))})")
    adapters = 16 * lora + crma[4]["training_bytes"]
    bases = {"bf16": base_bf16, "nf4": nf4}
    totals = {k: b + adapters + act[1]["checkpointing"] for k, b in bases.items()}
    totals_no_ckpt = {k: b + adapters + act[1]["no_checkpointing"] for k, b in bases.items()}
    eval_peak = {k: b + EVAL_BATCH * SEQ * cfg.vocab_size * EVAL_LOGIT_BYTES for k, b in bases.items()}
    return {"model": name, "hub_id": hub, "config_class": type(cfg).__name__,
            "hidden": d, "layers": L, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
            "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size, "tied": cfg.tie_word_embeddings,
            "params": total, "published_params": published, "count_check_ok": ok,
            "block_linear_params": block_linear, "base_bf16_bytes": base_bf16, "base_nf4_bytes": nf4,
            "base_nf4_double_quant_bytes": nf4_dq,
            "crma": crma, "lora_params": lora, "lora_file_bytes": 4 * lora, "lora_training_bytes": 16 * lora,
            "activations_seq512": act, "train_total_mb1_seq512_ckpt_bytes": totals,
            "train_total_mb1_seq512_no_ckpt_bytes": totals_no_ckpt,
            "eval_peak_batch8_seq512_bytes": eval_peak, "ok": ok}


def fits(total: float, card_gib: int) -> str:
    g = total / GIB
    return "yes" if g <= 0.8 * card_gib else "tight" if g <= card_gib else "no"


def tables(rows: list[dict]) -> str:
    out = ["### Parameters and base weights", "",
           "| model | params (counted) | published | layers | hidden | base bf16 | base NF4 | NF4, double quant |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['params']:,} | {r['published_params']:,} "
                   f"({'OK' if r['count_check_ok'] else 'MISMATCH'}) | {r['layers']} | {r['hidden']} | "
                   f"{r['base_bf16_bytes'] / GB:.2f} GB | {r['base_nf4_bytes'] / GB:.2f} GB | "
                   f"{r['base_nf4_double_quant_bytes'] / GB:.2f} GB |")
    out += ["", "### CRMA backbone (fp32) and one LoRA adapter (r=8, q,k,v,o,gate,up,down; fp32)", "",
            "| model | CRMA params n=4 | version file n=4 | training n=4 | CRMA params n=16 | version file n=16 "
            "| training n=16 | LoRA params | adapter file | LoRA training |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c4, c16 = r["crma"][4], r["crma"][16]
        cells = [r["model"], f"{c4['params']:,}", f"{c4['version_file_bytes'] / MB:.1f} MB",
                 f"{c4['training_bytes'] / MB:.1f} MB", f"{c16['params']:,}",
                 f"{c16['version_file_bytes'] / MB:.1f} MB", f"{c16['training_bytes'] / MB:.1f} MB",
                 f"{r['lora_params']:,}", f"{r['lora_file_bytes'] / MB:.1f} MB",
                 f"{r['lora_training_bytes'] / MB:.1f} MB"]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", f"### Activations, bf16, seq {SEQ}: a rough ESTIMATE (Korthikanti et al. 2022 per block, plus "
            "PEFT's fp32 LoRA inputs, CRMA's fp32 copies and the logits)", "",
            "| model | per token, no ckpt | mb 1, no ckpt | mb 1, ckpt | mb 8, no ckpt | mb 8, ckpt "
            "| of which logits (mb 1) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a1, a8 = r["activations_seq512"][1], r["activations_seq512"][8]
        out.append(f"| {r['model']} | {a1['no_checkpointing'] / SEQ / MB:.2f} MB | "
                   f"{a1['no_checkpointing'] / GB:.2f} GB | {a1['checkpointing'] / GB:.2f} GB | "
                   f"{a8['no_checkpointing'] / GB:.2f} GB | {a8['checkpointing'] / GB:.2f} GB | "
                   f"{a1['logits'] / GB:.2f} GB |")
    out += ["", f"### Training total per GPU: base + LoRA training + CRMA training (n=4) + activations "
            f"(micro batch 1, seq {SEQ}, checkpointing)", "",
            "yes: at most 80% of the card; tight: 80-100% (CUDA context, cuBLAS workspaces and allocator "
            "fragmentation take 1-3 GiB); no: over. Total without ckpt: the same at micro batch 1 without "
            "gradient checkpointing. Evaluation peak: base + logits of one "
            f"forward at batch {EVAL_BATCH} (eval_batch_size of the paper protocol), {EVAL_LOGIT_BYTES} bytes per "
            "vocab entry per token.", "",
            "| model | base | total | 24 GiB | 40 GiB | 80 GiB | total without ckpt | eval peak, batch 8 "
            "| eval on 24 GiB |", "|---|---|---:|---|---|---|---:|---:|---|"]
    for r in rows:
        for kind in ("bf16", "nf4"):
            t = r["train_total_mb1_seq512_ckpt_bytes"][kind]
            u = r["train_total_mb1_seq512_no_ckpt_bytes"][kind]
            e = r["eval_peak_batch8_seq512_bytes"][kind]
            out.append(f"| {r['model']} | {kind} | {t / GIB:.2f} GiB | " + " | ".join(fits(t, c) for c in CARDS_GIB)
                       + f" | {u / GIB:.2f} GiB | {e / GIB:.2f} GiB | {fits(e, 24)} |")
    return "\n".join(out) + "\n"


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                  # mkstemp makes 0600; give a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main() -> int:
    torch.set_num_threads(1)
    rows = [analyse(*m) for m in MODELS]
    md = tables(rows)
    header = ("# crma memory at scale (computed, not measured)\n\n"
              "Regenerate: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale_memory.py`. "
              "GB = 1e9 bytes, MB = 1e6 bytes, GiB = 2^30 bytes. Formulas: the script's docstring.\n\n")
    print(md)
    atomic_write(OUT / "memory.md", header + md)
    meta = {"transformers": tf.__version__, "torch": torch.__version__, "lora_r": LORA_R,
            "lora_targets": list(LORA_TARGETS), "seq": SEQ, "logit_bytes_per_vocab_token": LOGIT_BYTES,
            "note": "computed from exact parameter counts; activation and logit figures are rough estimates"}
    atomic_write(OUT / "memory.json", json.dumps({"meta": meta, "models": rows}, indent=2) + "\n")
    print(f"wrote {OUT / 'memory.md'} and {OUT / 'memory.json'}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
