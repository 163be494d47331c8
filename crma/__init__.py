"""crma: continual fine-tuning of causal LMs with a spectrally bounded CRMA backbone and per-domain LoRA.

Packages, each importing only those below it (tests/test_layers.py keeps it so):

    cli        every `crma` command, its options generated from the config dataclasses
    bench, serve, demo, export    the benchmark grid and report; the OpenAI-compatible server and the route
                               proxy; the demo; `crma export` for vLLM (and its vLLM plugin)
    engine     work on a live model: load a store's model, train, add a domain, run, evaluate, generate
    baselines  continual-learning baselines (ewc, replay, olora) and the core conditions' plain method
    store      the on-disk model store: manifest, versions, checksums, the writer lock
    routing    the router: features, statistics, decisions
    runtime, data          devices and processes; reading and batching text
    method     the CRMA math: Sinkhorn, the CRMA block and backbone, LoRA adapters, base models
    config, io, version    typed settings, atomic writes, the version
"""
from .version import __version__

__all__ = ["__version__"]
