"""Shared fixtures: tiny real models and small synthetic domains written to tmp folders."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from crma.config import DomainSpec, RunConfig, TrainConfig

FAMILIES = ("llama", "mistral", "gemma2", "phi3", "qwen2", "gpt2")


def write_cycle_domain(path: Path, cycle: str, n: int, seed: int) -> Path:
    """n passages that repeat `cycle` from a random offset: a domain with one fixed bigram rule."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            start = rng.randrange(len(cycle))
            text = "".join(cycle[(start + k) % len(cycle)] for k in range(rng.randrange(48, 64)))
            f.write(json.dumps({"text": text}) + "\n")
    return path


@pytest.fixture(scope="session")
def conflicting_domains(tmp_path_factory) -> list[DomainSpec]:
    """Two deliberately conflicting domains: 'abcd' cycles vs the reversed 'dcba' cycles."""
    root = tmp_path_factory.mktemp("conflict")
    return [DomainSpec("up", write_cycle_domain(root / "up.jsonl", "abcd", 40, 1),
                       write_cycle_domain(root / "up_hold.jsonl", "abcd", 8, 2)),
            DomainSpec("down", write_cycle_domain(root / "down.jsonl", "dcba", 40, 3),
                       write_cycle_domain(root / "down_hold.jsonl", "dcba", 8, 4))]


def tiny_run_config(domains, out, condition, model="tiny:llama", **train) -> RunConfig:
    settings = dict(epochs=3, lr=1e-2, batch_size=8, max_len=64, eval_batch_size=8)
    settings.update(train)
    return RunConfig(domains=domains, out=out, model=model, condition=condition, seed=0,
                     train=TrainConfig(**settings))


@pytest.fixture(scope="session")
def conflict_runs(conflicting_domains, tmp_path_factory) -> dict[str, dict]:
    """The three conditions on the conflicting domains (tiny:llama), run once for the whole session."""
    from crma.engine.run import continual_run

    root = tmp_path_factory.mktemp("runs")
    return {c: continual_run(tiny_run_config(conflicting_domains, root / c, c), progress=False)
            | {"_dir": root / c} for c in ("naive", "frozen", "modular")}


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run fastest on one thread, and one thread cannot oversubscribe a busy 2-core box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
