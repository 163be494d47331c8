"""crma's own greedy answers and token log-probabilities for every model of a `crma export`, as the reference the
vLLM check (tests/test_vllm.py, run by benchmarks/vllm_check.sh in vLLM's environment) compares vLLM with.

    python benchmarks/vllm_reference.py --store DIR --export DIR2 --out reference.json [--max-tokens 12]

For each served model of the export (a domain on the backbone version it was exported with, or `base`) and
each prompt: the prompt's token ids (crma serve's tokenisation of a completion prompt), the greedy
continuation crma computes (LiveModel.using: the adapter on its backbone version, fp32), and the
log-probability of each chosen token. Runs in crma's environment; no vLLM needed.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from crma.data import text_ids
from crma.engine.live import LiveModel
from crma.io import write_json
from crma.store import Store

PROMPTS = ["What are the common symptoms of iron deficiency anemia?",
           "The contract shall terminate if either party",
           "abcdabcdabcd",
           "def fibonacci(n):",
           "Bonjour, je voudrais"]


@torch.no_grad()
def greedy(model, ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy continuation of `ids` (full forward per step, fp32) and log p of each chosen token."""
    seq, tokens, logprobs = list(ids), [], []
    for _ in range(max_tokens):
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()          # (vocab,)
        logp = torch.log_softmax(logits, -1)
        tok = int(torch.argmax(logits))
        tokens.append(tok)
        logprobs.append(float(logp[tok]))
        seq.append(tok)
    return tokens, logprobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--export", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    record = json.loads((args.export / "export.json").read_text())
    live = LiveModel.open(Store(args.store))
    prompts = [{"text": p, "ids": text_ids(live.tokenizer, p)} for p in PROMPTS]
    models = {}
    for name, entry in record["models"].items():
        domain = None if name == "base" else name
        backbone = "latest" if record["backbone"] == "latest" else "pinned"
        with live.using(domain, backbone=backbone) as model:
            runs = [greedy(model, p["ids"], args.max_tokens) for p in prompts]
        models[name] = {"lora": entry["lora"], "tokens": [r[0] for r in runs], "logprobs": [r[1] for r in runs]}
        print(f"{name}: {live.tokenizer.decode(runs[0][0])!r}", flush=True)
    if record["base_model_name"] not in models:          # the plain base model (no LoRA, no backbone)
        with live.untouched() as model:
            runs = [greedy(model, p["ids"], args.max_tokens) for p in prompts]
        models[record["base_model_name"]] = {"lora": None, "tokens": [r[0] for r in runs],
                                             "logprobs": [r[1] for r in runs]}
    write_json(args.out, {"export": str(args.export.resolve()), "store": str(args.store.resolve()),
                          "condition": record["condition"], "max_tokens": args.max_tokens, "prompts": prompts,
                          "models": models})


if __name__ == "__main__":
    main()
