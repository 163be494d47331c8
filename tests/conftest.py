"""Shared fixtures: tiny real models and small synthetic domains written to tmp folders."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from crma.config import DomainSpec, RunConfig, TrainConfig
from crma.engine.run import continual_run
from tests.forked import kill_running

# One torch thread everywhere: in this process (the fixture below), in every `crma` subprocess a test
# starts, and in every server a test opens (Server.open sets $OMP_NUM_THREADS threads, else one per core:
# two xdist workers at two threads each on two cores run several times slower than at one).
os.environ["OMP_NUM_THREADS"] = "1"

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


class _Runs(dict):
    """condition -> continual_run result (+ "_dir"), each run the first time a test asks for it."""

    def __init__(self, domains: list[DomainSpec], root: Path):
        super().__init__()
        self.domains, self.root = domains, root

    def __missing__(self, condition: str) -> dict:
        out = self.root / condition
        self[condition] = continual_run(tiny_run_config(self.domains, out, condition), progress=False) | {"_dir": out}
        return self[condition]


@pytest.fixture(scope="session")
def conflict_runs(conflicting_domains, tmp_path_factory) -> dict[str, dict]:
    """naive, frozen and modular on the conflicting domains (tiny:llama), each run once per session
    (per xdist worker) when a test first needs it."""
    return _Runs(conflicting_domains, tmp_path_factory.mktemp("runs"))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and one thread cannot oversubscribe a busy 2-core box.
    Set before every test: a test that opens a server with --threads must not leave its count behind."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_child_left():
    """A test that fails before killing its `crma` child (tests/forked.py) does not leave it running."""
    yield
    kill_running()
