"""The `vllm serve` command of an export, as argv (export.json) and as a script (launch.sh).

    vllm serve OUT/base --served-model-name NAME --enable-lora --max-lora-rank R --max-loras K
               --lora-modules domain=OUT/loras/<folder> ... [--hf-overrides '{"architectures": [...]}']

A modular store's LoRA folders need the crma vLLM plugin (crma installed in vLLM's environment with
`pip install --no-deps`, docs/vllm.md): the override names its architecture, the base model with a
zero-weight `crma_out` linear after each block. The script sets
VLLM_ALLOW_RUNTIME_LORA_UPDATING so that a running vLLM can take a domain added later through
POST /v1/load_lora_adapter (export.json lists the requests under `hot_add`).
"""
from __future__ import annotations

import json
import shlex

# vLLM's accepted --max-lora-rank values (vllm.config.lora.LoRAConfig, 0.8 - 0.32)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
PLUGIN_ARCHITECTURES = {"LlamaForCausalLM": "CrmaLlamaForCausalLM"}   # what the crma vLLM plugin wraps


def max_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts for --max-lora-rank that holds `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")


def serve_command(base: str, served_name: str, loras: dict[str, str], rank: int, max_loras: int,
                  architecture: str | None, dtype: str = "auto", extra: tuple[str, ...] = ()) -> list[str]:
    """argv of `vllm serve` for the base folder `base`, LoRA modules {name: folder}, the largest LoRA rank,
    at most `max_loras` LoRAs in one batch, and (modular) the plugin architecture to load the base as."""
    argv = ["vllm", "serve", base, "--served-model-name", served_name]
    if dtype != "auto":
        argv += ["--dtype", dtype]
    if loras:
        argv += ["--enable-lora", "--max-lora-rank", str(max_lora_rank(rank)), "--max-loras", str(max_loras),
                 "--lora-modules", *(f"{name}={path}" for name, path in loras.items())]
    if architecture is not None:
        argv += ["--hf-overrides", json.dumps({"architectures": [architecture]})]
    return argv + list(extra)


def launch_script(argv: list[str], out: str, made_from: str) -> str:
    """launch.sh: the command with OUT/ replaced by the script's own folder (the export can be moved);
    extra arguments to the script are passed on to vllm serve (--port, --tensor-parallel-size, ...)."""
    prefix = out.rstrip("/") + "/"

    def word(arg: str) -> str:
        if prefix in arg:
            head, _, tail = arg.partition(prefix)
            return (shlex.quote(head) if head else "") + '"$HERE"/' + shlex.quote(tail)
        return shlex.quote(arg)
    words = [word(a) for a in argv]
    lines = ["#!/usr/bin/env bash", f"# {made_from}", "# Extra arguments go to vllm serve, e.g. --port 8001 "
             "--tensor-parallel-size 2.", "set -euo pipefail", 'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
             "export VLLM_ALLOW_RUNTIME_LORA_UPDATING=${VLLM_ALLOW_RUNTIME_LORA_UPDATING:-True}",
             "exec " + "".join((" \\\n    " if w.startswith("--") else " ") + w for w in words).lstrip()
             + ' \\\n    "$@"', ""]
    return "\n".join(lines)
