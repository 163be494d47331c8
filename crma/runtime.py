"""Where a job runs: device, dtype and processes, through Hugging Face Accelerate.

    --device auto|cpu|cuda|mps      auto: cuda, else mps, else cpu
    --dtype auto|float32|bfloat16   auto: bfloat16 where the device computes it natively, float32 on CPU
    --gradient-checkpointing        recompute activations in backward (non-reentrant, so DDP works)
    --load-in-4bit                  NF4 base weights through bitsandbytes (QLoRA); CUDA only
    --fsdp                          shard the frozen base weights across the launched processes

Several processes: `accelerate launch -m crma run ...` (or torchrun) starts N copies of the same
command. Each loads the same data and model; training splits every global batch across them (train.py),
evaluation splits the passages and gathers the per-passage losses (`shard` / `gather`), and only the
main process writes files (`on_main`, `is_main`). There is no separate multi-process code
path: on one process every helper here is the identity.

With --fsdp, PyTorch FSDP2 (`fully_shard`, one group per decoder block and one for the rest) shards the
frozen base model, the only large thing, so a model that does not fit one device trains on several;
the per-domain LoRA adapters and the CRMA backbone (megabytes) stay whole on every process, and their
gradients are summed across processes after each step (`all_reduce_grads`), as DDP would. Every
forward is then collective, so training and evaluation run the same number of forwards on every process
(as many as the `largest_share` needs), padding with forwards whose results are discarded.

On a CPU-only machine Accelerate treats launched processes as separate jobs unless told to use the CPU
(ACCELERATE_USE_CPU): `accelerator()` tells it whenever a launched job's device is the CPU, and refuses
to run if it was launched as several processes but Accelerate still sees one.
"""
from __future__ import annotations

import gc
import os
import pickle
import sys
import weakref
from dataclasses import asdict

import torch
import torch.distributed as dist
from accelerate import Accelerator, DistributedType
from accelerate.utils import broadcast_object_list, gather_object
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from .config import ConfigError, DeviceConfig
from .method.models import decoder_layers, fingerprint, load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(cfg: DeviceConfig) -> str:
    """The device type a job uses: cfg.device, or for auto the best one present."""
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to torch "
                          f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    if cfg.device == "mps" and not _mps_available():
        raise ConfigError("--device mps: the Apple MPS backend is not available here")
    return cfg.device


def _bf16_native(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)   # not emulated bf16 (V100, T4)
    if device == "mps":
        try:
            return bool((torch.ones(2, dtype=torch.bfloat16, device="mps") * 2).sum() == 4)
        except (RuntimeError, TypeError):
            return False
    return False          # CPUs compute bf16 matmuls, mostly by emulation: fp32 is the faster default


def resolve_dtype(cfg: DeviceConfig, device: str | None = None) -> torch.dtype:
    """The dtype of the base model's weights. LoRA weights stay fp32 (PEFT upcasts adapters on bf16
    bases) and the CRMA backbone always computes in fp32 (method/layer.py)."""
    device = device or resolve_device(cfg)
    if cfg.dtype == "auto":
        return torch.bfloat16 if _bf16_native(device) else torch.float32
    if cfg.dtype == "bfloat16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--dtype bfloat16: this CUDA device has no bfloat16 support; use --dtype float32")
    return DTYPES[cfg.dtype]


_ACCELERATOR = None
_SHARDED = False          # the base model of this process is sharded (--fsdp): every forward is collective
_SHARDED_MODELS: list[weakref.ref] = []   # the models shard_base sharded (freed of FSDP state in finish)


def accelerator(cfg: DeviceConfig | None = None):
    """This process's Accelerator (one per process: its device and process group are fixed at the first
    call). The CPU is requested explicitly so that launched CPU processes form one gloo group."""
    global _ACCELERATOR

    cfg = cfg or DeviceConfig()
    device = resolve_device(cfg)
    if _ACCELERATOR is not None:
        if _ACCELERATOR.device.type != device:
            raise ConfigError(f"--device {cfg.device}: this process already runs on {_ACCELERATOR.device.type}")
        return _ACCELERATOR
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "cpu" and launched > 1:
        os.environ["ACCELERATE_USE_CPU"] = "true"      # launched CPU processes: one gloo group, not N jobs
    acc = Accelerator(cpu=device == "cpu")
    if launched > 1 and acc.num_processes != launched:
        raise ConfigError(f"launched as {launched} processes but Accelerate runs {acc.num_processes}: they would "
                          "train separately. On CPU set ACCELERATE_USE_CPU=true; on GPUs check `accelerate config`")
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ConfigError(f"{acc.distributed_type.value} in the accelerate config: crma shards the frozen base "
                          "itself; launch as MULTI_GPU (data-parallel) and pass --fsdp (docs/scale.md). "
                          "DeepSpeed is not supported")
    if acc.device.type != device:
        raise ConfigError(f"--device {cfg.device}: Accelerate placed this process on {acc.device}")
    _ACCELERATOR = acc
    return acc


def finish(ok: bool = True) -> None:
    """End of a command: a launched process waits for the others (when it succeeded) and leaves the
    process group, so that no process exits with collective threads still running."""

    if _ACCELERATOR is None or not dist.is_initialized():
        return
    if ok:
        _ACCELERATOR.wait_for_everyone()
    for ref in _SHARDED_MODELS:        # FSDP holds gathered weights and collective work after a forward:
        model = ref()                  # released now, while the group and the interpreter are alive
        if model is not None:
            reshard(model)
    gc.collect()
    dist.destroy_process_group()


def exit_launched(code: int) -> None:
    """End a launched process (several processes) without interpreter finalization, where gloo's worker
    threads can still hold work that aborts a finished process (SIGABRT; pytorch/pytorch#179291). Output is
    flushed first; a process on its own returns normally."""
    if _ACCELERATOR is not None and _ACCELERATOR.num_processes > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def describe(cfg: DeviceConfig) -> dict:
    """What results.json records about where a job ran."""
    acc = accelerator(cfg)
    return {**asdict(cfg), "resolved_device": str(acc.device), "resolved_dtype": str(resolve_dtype(cfg)).split(".")[-1],
            "num_processes": acc.num_processes, "distributed_type": acc.distributed_type.value}


# ---- processes: all of these are the identity on one process --------------------------------------
def _state():
    """The process group: that of the job's accelerator (created with the automatic device if the job
    has not created one yet: a launched CPU job must join its gloo group before anything asks)."""
    return (_ACCELERATOR or accelerator()).state


def num_processes() -> int:
    return _state().num_processes


def is_main() -> bool:
    """True on the process that writes files (the only one when not launched)."""
    return _state().is_main_process


def shard(n: int, rank: int | None = None) -> range:
    """Process `rank`'s (default: this one's) contiguous share of n items; shares differ by at most one."""
    state = _state()
    size, rank = state.num_processes, state.process_index if rank is None else rank
    return range(rank * n // size, (rank + 1) * n // size)


def largest_share(n: int) -> int:
    """The most items any process gets from shard(n)."""
    return max(len(shard(n, r)) for r in range(num_processes()))


def base_sharded() -> bool:
    """True when this process's base model is sharded (--fsdp): forwards must run in lockstep."""
    return _SHARDED


def reshard(model) -> None:
    """Put a sharded base back in its sharded state on this process. Call it on every process after the
    main one alone touched the model: saving calls state_dict(), whose FSDP hook reshards the root
    weights that FSDP keeps gathered after a forward, and the next forward would then gather on the main
    process only (a collective mismatch)."""
    if not _SHARDED:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def all_reduce_grads(params: list) -> None:
    """Sum the gradients of (replicated) parameters over processes, in one flat buffer."""
    if num_processes() == 1:
        return
    for p in params:
        if p.grad is None:                   # same buffer layout on every process
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def gather(local: list) -> list:
    """Every process's list, concatenated in process order (the inverse of `shard`), on every process."""
    if num_processes() == 1:
        return list(local)
    return gather_object(list(local))


def broadcast(obj):
    """The main process's `obj`, on every process."""
    if num_processes() == 1:
        return obj
    return broadcast_object_list([obj], from_process=0)[0]


def all_sum(value: float) -> float:
    """Sum of a float over processes."""
    if num_processes() == 1:
        return value
    acc = _ACCELERATOR or accelerator()
    return float(acc.reduce(torch.tensor([value], dtype=torch.float64, device=acc.device), "sum"))


def on_main(fn, *args, **kwargs):
    """fn(*args, **kwargs) run on the main process only (writing files), its result returned on every
    process; every process waits for it, and if it failed there, every process raises the same error
    (a ConfigError stays a ConfigError), so nobody hangs and every process reports it alike."""
    if num_processes() == 1:
        return fn(*args, **kwargs)

    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as err:          # re-raised below, after the others have been told
            error = err
    told = error
    if error is not None:
        try:
            pickle.dumps(error)
        except Exception:                     # an exception that cannot travel: its text does
            told = RuntimeError(f"the main process failed: {type(error).__name__}: {error}")
    result, told = broadcast((result, told))
    if error is not None:
        raise error
    if told is not None:
        raise told
    return result


def load_placed(spec: str, cfg: DeviceConfig | None = None, seed: int = 0):
    """(model, tokenizer) of `spec` in the job's dtype, on this process's device, with gradient
    checkpointing if asked (non-reentrant: the reentrant variant breaks DDP and frozen-input LoRA)."""

    cfg = cfg or DeviceConfig()
    device = accelerator(cfg).device
    model, tokenizer = load_model(spec, seed=seed, dtype=resolve_dtype(cfg, device.type),
                                  load_in_4bit=cfg.load_in_4bit)
    if cfg.fsdp:
        shard_base(model, device)
    elif not cfg.load_in_4bit:                # 4-bit weights are placed by bitsandbytes at load
        model.to(device)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):       # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, tokenizer


def shard_base(model, device: torch.device) -> None:
    """Shard the frozen base model's weights over the processes with FSDP2 (`fully_shard` on every decoder
    block, then on the whole model for the embeddings, final norm and output layer), moving the shards to
    `device`. Adapters and the CRMA backbone added later stay ordinary (replicated) parameters."""
    global _SHARDED


    if num_processes() < 2:
        raise ConfigError("--fsdp shards the base model across processes: launch several "
                          "(accelerate launch --num_processes N -m crma ...)")
    fingerprint(model)                       # cached on the model, computed once from the whole weights
    for p in model.parameters():
        p.requires_grad_(False)
    mesh = init_device_mesh(device.type, (num_processes(),))
    for block in decoder_layers(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _SHARDED = True
    _SHARDED_MODELS.append(weakref.ref(model))
