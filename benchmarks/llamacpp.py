"""llama.cpp as the single-stream yardstick of benchmarks/decode_bench.py, through the npm package
node-llama-cpp (a benchmark-only tool, never a dependency of crma: `npm install node-llama-cpp
@node-llama-cpp/linux-x64` into a folder, passed as --llamacpp).

- `float_gguf`: the Q4_1 GGUF crma loads, dequantized, written as an F32 GGUF (the weights crma computes
  with) or with its matrices in F16;
- `lora_gguf`: one of a PEFT model's LoRA adapters as a llama.cpp LoRA GGUF (llama.cpp applies it at
  run time, x A^T B^T alpha / r added to each layer's output, as crma does: no merged weights);
- `llamacpp`: greedy decoding tokens/s of one prompt, with or without such an adapter.

llama.cpp's GGUF holds a Llama model's q and k projections with the rows of each head reordered for its
rotary layout (`permute`, as its converter writes them and transformers' GGUF loader undoes them), so a
LoRA B of q or k is reordered the same way.
"""
from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

NODE_SCRIPT = r"""
import {getLlama} from "node-llama-cpp";
const [path, threads, prompt, n, repeats, lora, scale] = [process.argv[2], Number(process.argv[3]), process.argv[4],
                                                          Number(process.argv[5]), Number(process.argv[6]),
                                                          process.argv[7], Number(process.argv[8] || 1)];
const llama = await getLlama({gpu: false, build: "never", maxThreads: threads});
const model = await llama.loadModel({modelPath: path, gpuLayers: 0});
const options = {threads: {ideal: threads, min: threads}, contextSize: 1024, batchSize: 512};
if (lora) options.lora = {adapters: [{filePath: lora, scale}]};
const context = await model.createContext(options);
const runs = [];
let text = null;
for (let r = 0; r < repeats; r++) {
  const seq = context.getSequence();
  let k = 0, first = 0; const t0 = performance.now(); const tokens = [];
  for await (const token of seq.evaluate(model.tokenize(prompt, true), {temperature: 0})) {
    if (k === 0) first = performance.now();
    tokens.push(token);
    if (++k >= n) break;
  }
  runs.push({prefill_s: (first - t0) / 1000, decode_tok_s: (k - 1) / ((performance.now() - first) / 1000)});
  text ??= model.detokenize(tokens, true);
  seq.dispose();
}
console.log(JSON.stringify({runs, text}));
"""
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def installed(folder: Path) -> bool:
    return (folder / "node_modules" / "node-llama-cpp").is_dir()


def float_gguf(src: Path, dst: Path, half: bool = False) -> Path:
    """The GGUF crma loads with every tensor dequantized to F32 (the weights crma computes with), or with
    `half` its matrices in F16 (vectors stay F32, as llama.cpp's converter keeps them)."""
    import numpy as np  # optional: only this comparison needs gguf and numpy
    from gguf import GGUFReader, GGUFValueType, GGUFWriter  # optional
    from gguf.quants import dequantize  # optional
    if dst.exists():
        return dst
    reader = GGUFReader(str(src))
    writer = GGUFWriter(str(dst), arch=reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        value = int(half) if name == "general.file_type" else field.contents()   # 0: all F32, 1: mostly F16
        writer.add_key_value(name, value, kind, field.types[1] if kind == GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type).astype(np.float32)
        data = data.reshape([int(x) for x in reversed(t.shape.tolist())])
        writer.add_tensor(t.name, data.astype(np.float16) if half and data.ndim > 1 else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def permute(w, heads: int):
    """llama.cpp's row order of a q or k projection's output (out, ...): within each head, the rotary pairs
    (i, i + hd/2) of transformers' rotate_half layout become adjacent rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def lora_gguf(model, adapter: str, dst: Path) -> Path:
    """`adapter`'s LoRA weights in the PEFT model `model` (a Llama-family decoder) as a llama.cpp LoRA
    GGUF: per projection blk.{i}.{name}.weight.lora_a = A (r, in) and .lora_b = B (out, r), with the
    adapter's alpha (llama.cpp scales by alpha / r, as PEFT does)."""
    import numpy as np  # optional
    from gguf import GGUFWriter  # optional
    from peft.tuners.lora import LoraLayer
    cfg = model.config
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    writer = GGUFWriter(str(dst), arch="llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(model.peft_config[adapter].lora_alpha))
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            parts = name.split(".")
            block, proj = parts[parts.index("layers") + 1], parts[-1]
            a = module.lora_A[adapter].weight.detach().float().numpy()                 # (r, in)
            b = module.lora_B[adapter].weight.detach().float().numpy()                 # (out, r)
            b = permute(b, heads[proj]) if proj in heads else b
            writer.add_tensor(f"blk.{block}.{GGUF_NAMES[proj]}.weight.lora_a", np.ascontiguousarray(a))
            writer.add_tensor(f"blk.{block}.{GGUF_NAMES[proj]}.weight.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def llamacpp(folder: Path, gguf: Path, threads: int, prompt: str, tokens: int, repeats: int,
             lora: Path | None = None, scale: float = 1.0) -> dict | str:
    """Greedy decoding of `prompt` (chat text, special tokens parsed) for `tokens` tokens, `repeats` times:
    median decoding tokens/s (first token to last) and prefill seconds, the first run's text; or why not."""
    if not installed(folder):
        return f"skipped: no node-llama-cpp in {folder}"
    script = folder / "crma_decode_bench.mjs"
    script.write_text(NODE_SCRIPT)
    done = subprocess.run(["node", str(script), str(gguf), str(threads), prompt, str(tokens), str(repeats),
                           str(lora or ""), str(scale)], capture_output=True, text=True, cwd=folder, timeout=600)
    if done.returncode != 0:
        return f"failed: {done.stderr.strip()[-300:]}"
    got = json.loads(done.stdout.strip().splitlines()[-1])
    runs = got["runs"]
    return {"decode_tok_s": round(statistics.median([r["decode_tok_s"] for r in runs]), 2),
            "prefill_s": round(statistics.median([r["prefill_s"] for r in runs]), 3), "runs": len(runs),
            "text": got["text"]}
