"""`crma bench`: the benchmark grid (conditions x seeds) of docs/method.md section 5, resumable.

    crma bench --corpus DIR --protocol paper|cpu|smoke --out OUT [--model M]
               [--conditions naive,frozen,modular] [--seeds 0,42,1234] [--resume] [--jobs N]
               [--crma-rho R ...] [--cl-ewc-lambda X ...]    # baselines: --conditions ewc,replay,olora

Every (condition, seed) run is a `crma.engine.run.continual_run` into OUT/<condition>-seed<seed>/ and writes
its own results.json as soon as it finishes. --resume skips folders whose results.json says
finished=true (after checking that they were made with the same settings), so a grid can be spread
over sessions or machines and merged by copying run folders into one OUT. Data order depends only
on the seed and the phase (crma.data.epoch_order), so runs on the same data see the same order in
every condition. After the grid (also when it stops early) OUT/summary.json and OUT/report.md are
written from whatever runs are finished (crma.bench.report.write_all).
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import runtime
from ..config import (
    ALL_CONDITIONS,
    CONDITIONS,
    CLConfig,
    ConfigError,
    CRMAConfig,
    DeviceConfig,
    DomainSpec,
    RunConfig,
    TrainConfig,
)
from ..data import DEMO_DIR, DataError
from ..engine.run import continual_run
from ..io import command_line, write_json
from .report import write_all

CL5_DOMAINS = ("medical", "legal", "finance", "code", "science")
PAPER_SEEDS = (0, 42, 1234)
# The five-domain corpus kept in the repository (benchmarks/corpora/cl5): the default --corpus of a clone.
REPO_CORPUS = Path(__file__).resolve().parents[2] / "benchmarks" / "corpora" / "cl5"
CL5 = REPO_CORPUS if REPO_CORPUS.is_dir() else None


@dataclass(frozen=True)
class Protocol:
    """Sizes of one benchmark protocol. Passages are the first N of each file (deterministic)."""

    name: str
    model: str
    domains: tuple[str, ...]
    train_passages: int          # per domain (TrainConfig.max_passages)
    holdout_passages: int        # per domain (TrainConfig.max_holdout)
    max_len: int                 # tokens per passage
    epochs: int
    lr: float                    # LoRA learning rate (CRMA rates: CRMAConfig defaults)
    batch_size: int
    eval_batch_size: int = 8
    seeds: tuple[int, ...] = PAPER_SEEDS
    conditions: tuple[str, ...] = CONDITIONS
    default_corpus: Path | None = None     # used when --corpus is omitted
    long_inputs: str = "truncate"  # passages longer than max_len keep their first max_len tokens (as published)
    tasks: bool = False            # score <corpus>/<domain>/tasks.jsonl (and general/tasks.jsonl) after every phase

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, max_len=self.max_len,
                           eval_batch_size=self.eval_batch_size, max_passages=self.train_passages,
                           max_holdout=self.holdout_passages, long_inputs=self.long_inputs)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["default_corpus"] = str(self.default_corpus) if self.default_corpus else None
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# docs/method.md section 5 exactly: 5 domains in order, 500 train / 100 holdout, seeds 0, 42, 1234, all
# three conditions. The paper's model is Mistral-7B (pass --model mistralai/Mistral-7B-v0.1 where the
# hub is reachable); the default is the largest model reachable offline. Its training settings are not
# public: max_len 512 keeps all but the longest code passages whole (code p90: 565 tokens); 3 epochs at batch 8
# give 3 x 63 = 189 optimizer steps per domain, 945 per run, the scale of the paper's 867 logged steps.
PAPER = Protocol("paper", model="smollm2-135m", domains=CL5_DOMAINS, train_passages=500, holdout_passages=100,
                 max_len=512, epochs=3, lr=2e-4, batch_size=8, default_corpus=CL5, tasks=True)

# Same domains, order, seeds and conditions, sized for about 2.5 h for all 9 runs on 2 CPU cores with
# smollm2-135m in fp32 (benchmarks/README.md has the measurements). Measured here at max_len 128:
# training 180 tokens/s frozen, 163 modular (batch 4); forward-only eval 420-450 tokens/s (batch 8);
# model load 15 s; router features (run.py builds the router each phase) 13-28 s per domain. Every
# prose cl5 passage and 93% of code ones exceed 128 tokens, so a passage costs max_len tokens. Per run:
#   train  5 domains x 160 passages x 1 epoch x 128 tokens = 102,400 tokens (40 steps per domain)
#   eval   6 evaluations (base + after each phase) x 5 domains x 20 passages x 128 = 76,800 tokens
# With 15-20% slack on the measured rates (150 / 135 / 350 tokens/s, load 20 s, router 120 s):
#   naive, frozen  102,400/150 + 76,800/350 + 20 + 120 = 1,042 s;   modular  102,400/135 + 359 = 1,118 s
#   grid = 3 seeds x (2 x 1,042 + 1,118) = 9,606 s = 2.7 h   (2.2 h at the measured rates).
# lr 1e-3 (not the 2e-4 default): 40 steps per domain must move a LoRA adapter measurably.
CPU = Protocol("cpu", model="smollm2-135m", domains=CL5_DOMAINS, train_passages=160, holdout_passages=20,
               max_len=128, epochs=1, lr=1e-3, batch_size=4, default_corpus=CL5, tasks=True)

# The test-suite protocol: a random 2-layer tiny:llama, two bundled demo domains, two seeds; seconds.
# It runs every condition, the continual-learning baselines (ewc, replay, olora) included.
SMOKE = Protocol("smoke", model="tiny:llama", domains=("cooking", "contracts"), train_passages=16,
                 holdout_passages=4, max_len=64, epochs=2, lr=1e-2, batch_size=4, eval_batch_size=4,
                 seeds=(0, 42), conditions=ALL_CONDITIONS, default_corpus=DEMO_DIR)

PROTOCOLS = {p.name: p for p in (PAPER, CPU, SMOKE)}


def run_dir(out: Path, condition: str, seed: int) -> Path:
    return Path(out) / f"{condition}-seed{seed}"


def domain_specs(protocol: Protocol, corpus: Path | None) -> list[DomainSpec]:
    """<corpus>/<domain>/{train,holdout}.jsonl for each protocol domain, in order; missing files named."""
    corpus = Path(corpus) if corpus else protocol.default_corpus
    if corpus is None:
        raise ConfigError(f"--corpus: protocol {protocol.name!r} needs a corpus folder "
                          f"(<corpus>/<domain>/train.jsonl and holdout.jsonl for {', '.join(protocol.domains)})")
    specs = [DomainSpec(d, corpus / d / "train.jsonl", corpus / d / "holdout.jsonl") for d in protocol.domains]
    missing = [p for s in specs for p in (s.train, s.holdout) if not Path(p).is_file()]
    if missing:
        raise DataError(f"corpus {corpus} lacks files of protocol {protocol.name!r}: {', '.join(missing)}")
    return specs


GENERAL = "general"           # <corpus>/general/tasks.jsonl: the off-domain task set


def task_sources(protocol: Protocol, corpus: Path | None) -> dict[str, str]:
    """<corpus>/<domain>/tasks.jsonl for every protocol domain (benchmarks/build_tasks.py writes them) and
    <corpus>/general/tasks.jsonl when there is one; {} for a protocol without tasks. Missing files named."""
    if not protocol.tasks:
        return {}
    corpus = Path(corpus) if corpus else protocol.default_corpus
    sources = {d: corpus / d / "tasks.jsonl" for d in protocol.domains}
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise DataError(f"corpus {corpus} lacks the task files of protocol {protocol.name!r}: {', '.join(missing)} "
                        f"(python benchmarks/build_tasks.py --corpus {corpus} writes them)")
    if (corpus / GENERAL / "tasks.jsonl").is_file():
        sources[GENERAL] = corpus / GENERAL / "tasks.jsonl"
    return {name: str(path) for name, path in sources.items()}


def _identity(cfg: dict) -> dict:
    """The settings that define a run, without paths (a grid may move between machines). CRMA settings
    only define modular runs: naive and frozen have no backbone, so they are shared across CRMA ablations.
    Likewise a baseline's settings (--cl-ewc-*, --cl-replay-*, --cl-olora-*) define only its own runs."""
    train = dataclasses.asdict(TrainConfig(**cfg["train"]))     # settings added later take their defaults
    train.pop("micro_batch_size")                               # memory, not math
    return {"model": cfg["model"], "condition": cfg["condition"], "seed": cfg["seed"],
            "domains": [d["name"] for d in cfg["domains"]], "train": train, "lora": cfg["lora"],
            "crma": cfg["crma"] if cfg["condition"] == "modular" else None,
            "cl": CLConfig(**cfg.get("cl", {})).for_condition(cfg["condition"]),
            "load_in_4bit": cfg.get("device", {}).get("load_in_4bit", False),   # NF4 weights change the model
            "tasks": sorted(cfg.get("tasks", {}))}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def plan_grid(protocol: Protocol, out: Path, corpus: Path | None = None, model: str | None = None,
              conditions: list[str] | None = None, seeds: list[int] | None = None,
              resume: bool = False, crma: CRMAConfig | None = None,
              cl: CLConfig | None = None, device: DeviceConfig | None = None,
              micro_batch_size: int = 0) -> list[tuple[RunConfig, bool]]:
    """(RunConfig, already finished) for every run, seed-major so each seed's comparison completes
    early. Fails before any training if a finished run would be overwritten (no --resume) or was
    made with other settings."""
    specs = domain_specs(protocol, corpus)
    tasks = task_sources(protocol, corpus)
    conditions = list(conditions or protocol.conditions)
    bad = [c for c in conditions if c not in ALL_CONDITIONS]
    if bad:
        raise ConfigError(f"--conditions: unknown {bad}; choose from {', '.join(ALL_CONDITIONS)}")
    plan = []
    for seed in seeds if seeds is not None else protocol.seeds:
        for cond in conditions:
            cfg = RunConfig(domains=specs, out=run_dir(out, cond, seed), model=model or protocol.model,
                            condition=cond, seed=seed, crma=crma or CRMAConfig(), cl=cl or CLConfig(),
                            train=dataclasses.replace(protocol.train_config(), micro_batch_size=micro_batch_size),
                            device=device or DeviceConfig(), tasks=tasks)
            old = _read_json(cfg.out / "results.json")
            done = bool(old and old.get("finished"))
            if done and not resume:
                raise ConfigError(f"{cfg.out} already holds a finished run; pass --resume to keep it "
                                  "(and run only what is missing), or choose another --out")
            if done and _identity(old["config"]) != _identity(cfg.to_dict()):
                raise ConfigError(f"{cfg.out}: the finished run there was made with other settings "
                                  "(model, sizes or hyperparameters); use another --out")
            plan.append((cfg, done))
    return plan


def merge_protocol(old: dict | None, new: dict) -> dict:
    """protocol.json of a grid filled by several invocations (sessions, machines, one seed each):
    the union of their grids, in seed-then-condition order, and every command that added to it.
    A folder last used with another protocol or model starts afresh."""
    defaults = {"crma": dataclasses.asdict(CRMAConfig()),   # folders written before --crma-* / --cl-* existed
                "cl": dataclasses.asdict(CLConfig())}
    same = old is not None and all(old.get(k, defaults.get(k)) == new[k]
                                   for k in new if k not in ("grid", "commands", "corpus", "default_corpus"))
    if not same:
        return new
    grid = {(c, s) for c, s in old.get("grid", []) + new["grid"]}
    extra = sorted({s for _, s in grid} - set(new["seeds"]))
    seeds = [s for s in list(new["seeds"]) + extra if any(s == g for _, g in grid)]
    conds = [c for c in ALL_CONDITIONS if any(c == g for g, _ in grid)]
    commands = old.get("commands", [old["command"]] if "command" in old else [])
    return {**new, "grid": [[c, s] for s in seeds for c in conds if (c, s) in grid],
            "commands": commands + [c for c in new["commands"] if c not in commands]}


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def estimate_left(durations: dict[str, list[float]], remaining: list[str]) -> float | None:
    """ETA: each remaining run costs the mean wall time of finished runs of its condition
    (of any condition when none of its own has finished); None before any run has a duration."""
    every = [d for ds in durations.values() for d in ds]
    if not every:
        return None
    overall = sum(every) / len(every)
    return sum(sum(durations[c]) / len(durations[c]) if durations.get(c) else overall for c in remaining)


def run_one(cfg: RunConfig, command: str, progress: bool = True, threads: int | None = None) -> float:
    """One run of the grid (here or in a worker process): continual_run, then bench_run.json with its
    wall seconds (the ETA of later sessions). `threads` pins torch's intra-op threads first."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    continual_run(cfg, command=f"{command}  # run {cfg.condition}-seed{cfg.seed}", progress=progress)
    wall = time.perf_counter() - t0
    runtime.on_main(write_json, cfg.out / "bench_run.json",
                    {"wall_seconds": wall, "torch_threads": torch.get_num_threads(),
                     "num_processes": runtime.num_processes(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return wall


def _in_workers(todo: list[RunConfig], jobs: int, command: str):
    """Yield (cfg, wall seconds) as runs finish in `jobs` single-threaded worker processes.
    On 2 cores, two one-thread runs side by side each keep the speed of one run alone, while one
    two-thread process is only ~1.4x faster than one thread (benchmarks/README.md)."""
    env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"          # inherited by the spawned workers
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_one, cfg, command, False, 1): cfg for cfg in todo}
            try:
                for fut in as_completed(futures):
                    yield futures[fut], fut.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env


def run_grid(protocol: Protocol, out: str | Path, corpus: str | Path | None = None, model: str | None = None,
             conditions: list[str] | None = None, seeds: list[int] | None = None, resume: bool = False,
             progress: bool = True, command: str | None = None, jobs: int = 1,
             crma: CRMAConfig | None = None, cl: CLConfig | None = None, device: DeviceConfig | None = None,
             micro_batch_size: int = 0) -> dict:
    """Run the grid (skipping finished runs under --resume), then write summary.json and report.md.
    jobs > 1 runs that many runs at once, each in its own single-threaded process (no per-run bars).
    `crma` overrides the CRMA settings (defaults: CRMAConfig()) to compare them on the same protocol;
    `cl` the baselines' settings (defaults: CLConfig())."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    out = Path(out)
    crma, cl, device = crma or CRMAConfig(), cl or CLConfig(), device or DeviceConfig()
    if jobs > 1 and runtime.accelerator(device).num_processes > 1:
        raise ConfigError(f"--jobs {jobs}: under a multi-process launch every run already uses all processes; "
                          "use --jobs 1")
    plan = plan_grid(protocol, out, Path(corpus) if corpus else None, model, conditions, seeds, resume, crma, cl,
                     device, micro_batch_size)
    command = command or command_line()
    runtime.on_main(write_json, out / "protocol.json", merge_protocol(
        _read_json(out / "protocol.json"),
        {**protocol.to_dict(), "model": model or protocol.model, "corpus": str(corpus or protocol.default_corpus),
         "crma": dataclasses.asdict(crma), "cl": dataclasses.asdict(cl),
         "grid": [[c.condition, c.seed] for c, _ in plan], "commands": [command]}))
    durations: dict[str, list[float]] = {}
    for meta_path in sorted(out.glob("*/bench_run.json")):   # every finished run in OUT feeds the ETA
        meta, res = _read_json(meta_path), _read_json(meta_path.parent / "results.json") or {}
        if meta and res.get("finished") and res.get("condition"):
            durations.setdefault(res["condition"], []).append(meta["wall_seconds"])
    todo = [cfg for cfg, done in plan if not done]
    jobs = min(jobs, max(len(todo), 1))
    say = (lambda msg: print(msg, flush=True)) if progress and runtime.is_main() else (lambda msg: None)
    say(f"crma bench: protocol {protocol.name}, {len(plan)} runs, {len(plan) - len(todo)} already finished, "
        f"{len(todo)} to run" + (f" in {jobs} single-threaded processes" if jobs > 1 else "") + f" -> {out}")
    start = time.perf_counter()

    def eta(left: list[RunConfig]) -> str:
        secs = estimate_left(durations, [c.condition for c in left])
        return _hms(secs / min(jobs, max(len(left), 1))) if secs is not None else "unknown"

    threads = torch.get_num_threads()
    if (model or protocol.model).startswith("tiny:"):
        torch.set_num_threads(1)     # tiny models are op-overhead bound; threads only add contention
    try:
        if jobs == 1:
            for n, cfg in enumerate(todo, 1):
                say(f"[bench {n}/{len(todo)}] {cfg.condition} seed {cfg.seed} | elapsed "
                    f"{_hms(time.perf_counter() - start)} | ETA {eta(todo[n - 1:])}")
                wall = run_one(cfg, command, progress)
                durations.setdefault(cfg.condition, []).append(wall)
                say(f"[bench {n}/{len(todo)}] {cfg.condition} seed {cfg.seed} finished in {_hms(wall)}")
        else:
            say(f"[bench] started {', '.join(f'{c.condition}-seed{c.seed}' for c in todo[:jobs])} | ETA {eta(todo)}")
            left = list(todo)
            for n, (cfg, wall) in enumerate(_in_workers(todo, jobs, command), 1):
                left.remove(cfg)
                durations.setdefault(cfg.condition, []).append(wall)
                say(f"[bench {n}/{len(todo)}] {cfg.condition} seed {cfg.seed} finished in {_hms(wall)} | "
                    f"elapsed {_hms(time.perf_counter() - start)} | ETA {eta(left) if left else '0:00:00'}")
    finally:
        torch.set_num_threads(threads)
        summary = runtime.on_main(write_all, out)
        say(f"crma bench: {summary['n_finished']} finished runs summarised in {out / 'summary.json'} "
            f"and {out / 'report.md'}")
    return summary
