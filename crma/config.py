"""Typed configuration for every crma job: dataclasses with defaults and validation.

The CLI is generated from these fields (crma/cli/options.py; `opt` carries a field's help), and the
resolved config is written next to every result, so a results.json always says exactly how it was
produced.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

CONDITIONS = ("naive", "frozen", "modular")            # the core conditions (docs/method.md section 3)
BASELINES = ("ewc", "replay", "olora")                 # continual-learning baselines (crma/baselines), run/bench only
ALL_CONDITIONS = CONDITIONS + BASELINES
SHARED_ADAPTER_CONDITIONS = ("naive", "ewc", "replay")  # one LoRA adapter named `shared`, trained on every domain


REQUIRED = dataclasses.MISSING   # a field without a default: a required option


def opt(default=REQUIRED, *, help: str = "", choices=None, positional: bool = False, metavar: str | None = None,
        hidden: bool = False):
    """A dataclass field with command-line metadata. No default: a required option (or positional)."""
    meta = {"help": help, "choices": choices, "positional": positional, "metavar": metavar, "hidden": hidden}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class ConfigError(ValueError):
    """A setting that cannot work, named by its field."""


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


DOMAIN_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
RESERVED_NAMES = frozenset({"base", "auto", "shared", "latest", "pinned", "all", "none", "default",
                            "router", "backbone", "adapters"})


def check_domain_name(name: str, what: str = "domain name") -> str:
    """Domain names become folder names in a store: `[a-z0-9][a-z0-9_-]{0,63}`, not a reserved word.
    Anything else (paths, dots, spaces, capitals) is refused."""
    if not isinstance(name, str) or not DOMAIN_NAME.fullmatch(name):
        raise ConfigError(f"{what} {name!r} is not allowed: use 1-64 characters a-z, 0-9, '_' or '-', "
                          "starting with a letter or digit (no paths, dots, spaces or capitals)")
    if name in RESERVED_NAMES:
        raise ConfigError(f"{what} {name!r} is reserved ({', '.join(sorted(RESERVED_NAMES))})")
    return name


@dataclass
class CRMAConfig:
    """The CRMA backbone (docs/method.md section 2). Defaults chosen by measurement, see README."""

    n_streams: int = 4          # n: streams read from / written to the residual stream
    sinkhorn_iters: int = 30    # K: fixed Sinkhorn iterations (see README: measured convergence)
    tau: float = 1.0            # temperature of the mixing logits
    rho: float = 0.1            # gate bound: |alpha| <= rho, so ||dh|| <= rho * ||h||
    theta_init: float = 1.0     # diagonal of Theta at init (M diagonal-dominant; see README)
    read_init: str = "pissa"    # "pissa" (top singular directions of the block's MLP output) or "random"
    lr_theta: float = 1e-2      # learning rate of the mixing logits Theta
    lr_gate: float = 1e-2       # learning rate of the gate a
    lr_rw: float = 1e-3         # learning rate of the read/write matrices

    def __post_init__(self) -> None:
        _check(self.n_streams >= 1, "crma.n_streams", f"must be >= 1, got {self.n_streams}")
        _check(self.sinkhorn_iters >= 1, "crma.sinkhorn_iters", f"must be >= 1, got {self.sinkhorn_iters}")
        _check(self.tau > 0, "crma.tau", f"must be > 0, got {self.tau}")
        _check(0 < self.rho <= 1, "crma.rho", f"must be in (0, 1], got {self.rho}")
        _check(self.read_init in ("pissa", "random"), "crma.read_init",
               f"must be 'pissa' or 'random', got {self.read_init!r}")
        for name in ("lr_theta", "lr_gate", "lr_rw"):
            _check(getattr(self, name) >= 0, f"crma.{name}", "must be >= 0")


@dataclass
class LoraSettings:
    """The per-domain PEFT LoRA adapter. targets=None means all attention and MLP linears of the family."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _check(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}")
        _check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str):
            self.targets = tuple(t for t in self.targets.split(",") if t)


FORMATS = ("auto", "text", "messages", "prompt-completion", "alpaca", "sharegpt")
LONG_INPUTS = ("window", "truncate")
LOSS_ON = ("completion", "all")


@dataclass
class TrainConfig:
    """One training phase (one domain)."""

    epochs: int = 1
    lr: float = 2e-4            # LoRA learning rate
    batch_size: int = 4
    max_len: int = 256          # tokens per example (longer documents are windowed, see long_inputs)
    grad_clip: float = 1.0      # clip the total gradient norm; the pre-clip norm is logged
    eval_batch_size: int = 8
    max_passages: int = 0       # use at most this many training passages per domain (0 = all)
    max_holdout: int = 0        # use at most this many holdout passages per domain (0 = all)
    holdout_fraction: float = 0.1  # held out of the train file when no holdout file is given
    micro_batch_size: int = 0   # rows per forward in each process (0: its whole share of the batch); the
                                # gradient is accumulated over micro-batches, so it changes memory, not the math
    format: str = "auto"        # record format (docs/data.md): auto|text|messages|prompt-completion|alpaca|sharegpt
    columns: str = ""           # column mapping FIELD=COLUMN,... (e.g. prompt=question,completion=answer)
    long_inputs: str = "window"  # text longer than max_len: window (consecutive windows) | truncate (first max_len)
    stride: int = 0             # tokens each window overlaps the previous one (context only, no loss)
    loss_on: str = "completion"  # conversations: loss on the answers only (completion) or on every token (all)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.max_len >= 2, "train.max_len", f"must be >= 2, got {self.max_len}")
        _check(self.grad_clip > 0, "train.grad_clip", f"must be > 0, got {self.grad_clip}")
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
        _check(self.max_passages >= 0 and self.max_holdout >= 0, "train.max_passages", "must be >= 0")
        _check(0 < self.holdout_fraction < 1, "train.holdout_fraction",
               f"must be in (0, 1), got {self.holdout_fraction}")
        _check(self.micro_batch_size >= 0, "train.micro_batch_size", f"must be >= 0, got {self.micro_batch_size}")
        _check(self.format in FORMATS, "train.format", f"must be one of {', '.join(FORMATS)}, got {self.format!r}")
        _check(self.long_inputs in LONG_INPUTS, "train.long_inputs",
               f"must be one of {', '.join(LONG_INPUTS)}, got {self.long_inputs!r}")
        _check(0 <= self.stride < self.max_len - 1, "train.stride",
               f"must be >= 0 and below max_len - 1 ({self.max_len - 1}), got {self.stride}")
        _check(self.loss_on in LOSS_ON, "train.loss_on", f"must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}")

    @classmethod
    def recorded(cls, train: dict) -> TrainConfig:
        """The settings an adapter recorded in its meta.json. Adapters from before records had formats were
        trained on truncated passages with the loss on every token: those are their defaults."""
        old = {"long_inputs": "truncate", "loss_on": "all"}
        return cls(**{**old, **{k: v for k, v in train.items() if k in cls.__dataclass_fields__}})


DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class DeviceConfig:
    """Where a job runs (crma/runtime.py): device, base weight dtype, memory savers. Recorded in config.json
    but not part of a run's identity: the same run on a CPU or a GPU means the same thing."""

    device: str = "auto"        # auto: cuda, else mps, else cpu
    dtype: str = "auto"         # auto: bfloat16 where the device computes it natively, float32 on CPU
    gradient_checkpointing: bool = False   # non-reentrant activation recomputation (works under DDP)
    load_in_4bit: bool = False  # NF4 base weights through bitsandbytes (CUDA only)
    fsdp: bool = False          # shard the frozen base weights across processes (FSDP2, per decoder block);
                                # adapters and the CRMA backbone stay whole on every process

    def __post_init__(self) -> None:
        _check(self.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        _check(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _check(not (self.fsdp and self.load_in_4bit), "fsdp", "cannot shard 4-bit (bitsandbytes) weights; "
               "use one of --fsdp and --load-in-4bit")


@dataclass
class TaskConfig:
    """How task items are scored (crma/engine/tasks.py): `crma add --tasks`, `crma eval --tasks`, the benchmark."""

    max_new_tokens: int = 64    # free-form items: tokens generated per answer (greedy)
    batch_size: int = 8         # rows per forward: answers generated together, choices scored together

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "task.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _check(self.batch_size >= 1, "task.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class CLConfig:
    """The continual-learning baselines (crma/baselines). Each field defines only its own condition's runs
    (ewc_* ewc, replay_* replay, olora_* olora), so changing one never invalidates the others' results.
    None of these was tuned on cl5: they are the papers' / common practice's values, as said per field."""

    # EWC (Kirkpatrick et al. 2017). 400 is the EWC default of TRACE (Wang et al. 2023), the LLM continual-
    # learning benchmark, whose Fisher is likewise squared gradients of the mean-token loss. Our Fisher is per
    # passage (crma/baselines/ewc.py), so the Laplace (Bayesian) value is about the tokens per passage (~127 at
    # max_len 128): 400 is the usual stronger-than-Bayesian regime of EWC, not a tuned optimum.
    ewc_lambda: float = 400.0
    ewc_fisher: str = "empirical"   # "empirical": gradients of the gold tokens' loss (what LLM EWC code uses);
                                    # "sampled": tokens drawn from the model (the true Fisher, one draw/position)
    ewc_fisher_passages: int = 0    # passages of the phase's training data the Fisher uses (0 = all of them)
    # Experience replay. 200 is the smallest standard reservoir of the replay literature (Buzzega et al. 2020,
    # buffers of 200 / 500 / 5120); ratio 0.25 puts one replayed passage in every batch of 4 (3 new + 1 old),
    # between LLM practice (1-10% rehearsal) and ER's equal halves (Chaudhry et al. 2019).
    replay_buffer: int = 200        # passages kept (as text) from earlier domains, reservoir-sampled
    replay_ratio: float = 0.25      # fraction of each later phase's training passages drawn from the buffer
    # O-LoRA (Wang et al., Findings of EMNLP 2023): lambda_1 = 0.5, lambda_2 = 0 are the values of the authors'
    # released scripts (also TRACE's defaults); see crma/baselines/olora.py for the squared vs L1 norm.
    olora_lambda1: float = 0.5      # orthogonality to earlier tasks' frozen A
    olora_lambda2: float = 0.0      # L2 on the new task's LoRA weights

    def __post_init__(self) -> None:
        _check(self.ewc_lambda >= 0, "cl.ewc_lambda", f"must be >= 0, got {self.ewc_lambda}")
        _check(self.ewc_fisher in ("empirical", "sampled"), "cl.ewc_fisher",
               f"must be 'empirical' or 'sampled', got {self.ewc_fisher!r}")
        _check(self.ewc_fisher_passages >= 0, "cl.ewc_fisher_passages", "must be >= 0 (0 = all)")
        _check(self.replay_buffer >= 1, "cl.replay_buffer", f"must be >= 1, got {self.replay_buffer}")
        _check(0 <= self.replay_ratio < 1, "cl.replay_ratio", f"must be in [0, 1), got {self.replay_ratio}")
        for name in ("olora_lambda1", "olora_lambda2"):
            _check(getattr(self, name) >= 0, f"cl.{name}", f"must be >= 0, got {getattr(self, name)}")

    def for_condition(self, condition: str) -> dict | None:
        """The fields that define `condition`'s runs (None for the core conditions)."""
        prefix = {"ewc": "ewc_", "replay": "replay_", "olora": "olora_"}.get(condition)
        return None if prefix is None else {k: v for k, v in dataclasses.asdict(self).items() if k.startswith(prefix)}


@dataclass
class DomainSpec:
    """One domain of a continual run or an add: its name (the adapter's name) and its data sources."""

    name: str
    train: str                  # a file, a folder, a saved dataset or hf://NAME?... (docs/data.md)
    holdout: str | None = None
    route_examples: str | None = None   # example queries for the router (crma add --route-examples)

    def __post_init__(self) -> None:
        check_domain_name(self.name)
        self.train = str(self.train)
        self.holdout = str(self.holdout) if self.holdout else None
        self.route_examples = str(self.route_examples) if self.route_examples else None

    @classmethod
    def parse(cls, arg: str) -> DomainSpec:
        """NAME=TRAIN[:HOLDOUT] -> DomainSpec (the paths split at the first ':' that does not start '://')."""
        name, sep, paths = arg.partition("=")
        _check(bool(sep and name and paths), "domains", f"expected NAME=TRAIN[:HOLDOUT], got {arg!r}")
        train, holdout = split_source(paths)
        return cls(name=name, train=train, holdout=holdout)


def split_source(arg: str) -> tuple[str, str | None]:
    """TRAIN[:HOLDOUT] -> (train, holdout), splitting at the first ':' that does not start a '://' scheme."""
    at = 0
    while (i := arg.find(":", at)) >= 0:
        if arg.startswith("//", i + 1):
            at = i + 3
            continue
        return arg[:i], arg[i + 1:] or None
    return arg, None


@dataclass
class RunConfig:
    """A continual run: train the domains in order under one condition, evaluate after every phase."""

    domains: list[DomainSpec]
    out: Path
    model: str = "smollm2-135m"
    condition: str = "modular"
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    crma: CRMAConfig = field(default_factory=CRMAConfig)
    cl: CLConfig = field(default_factory=CLConfig)          # used by the baseline conditions only
    device: DeviceConfig = field(default_factory=DeviceConfig)
    tasks: dict[str, str] = field(default_factory=dict)   # task set name -> source (docs/tasks.md)
    task: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self) -> None:
        _check(self.condition in ALL_CONDITIONS, "condition",
               f"must be one of {', '.join(ALL_CONDITIONS)}, got {self.condition!r}")
        _check(len(self.domains) >= 1, "domains", "give at least one NAME=TRAIN[:HOLDOUT]")
        names = [d.name for d in self.domains]
        _check(len(set(names)) == len(names), "domains", f"duplicate domain names in {names}")
        self.out = Path(self.out)

    def to_dict(self) -> dict:
        """JSON-ready resolved settings (paths as strings)."""
        def clean(value):
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            return value
        return clean(dataclasses.asdict(self))
