"""Worker of tests/test_scale.py, started by `accelerate launch --num_processes 2` (one launch: process
start-up is most of what a launch costs). In one process group, each process:

1. trains one modular phase data-parallel (tiny:llama, global batch 5 so the shares are 3 and 2 rows,
   micro-batches of 2) and records the process group and a checksum of every trainable parameter;
2. does the same with the frozen base sharded (--fsdp): also how many base weights it holds;
3. runs `crma run` with an --out folder that holds another file: the main process finds it, and every
   process must stop with the same error (recorded), nothing written.

    accelerate launch --multi_gpu --num_processes 2 tests/dist_worker.py DATA.jsonl OUT_DIR BUSY_DIR
"""
import contextlib
import hashlib
import io
import json
import sys
from pathlib import Path

import torch


def train(data: str, fsdp: bool) -> dict:
    import torch.distributed as dist

    from crma import runtime
    from crma.baselines import make_method
    from crma.config import CRMAConfig, DeviceConfig, DomainSpec, TrainConfig
    from crma.engine.add import AddSettings, load_spec, train_domain
    from crma.engine.live import LiveModel

    device = DeviceConfig(device="cpu", fsdp=fsdp)
    acc = runtime.accelerator(device)
    live = LiveModel.fresh("tiny:llama", "modular", seed=0, device=device)
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=5, max_len=48, micro_batch_size=2, max_passages=10,
                      long_inputs="truncate")
    dom = load_spec(DomainSpec("up", str(data)), live.tokenizer, cfg)
    adapter, log = train_domain(live, dom, 0, AddSettings(train=cfg, crma=CRMAConfig()), acc,
                                make_method(live.condition))
    base = [p for n, p in live.model.named_parameters() if "lora_" not in n and "crma_" not in n]
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in base)
    digest = hashlib.sha256()
    for name, p in sorted(live.model.named_parameters()):
        if "lora_" in name or "crma_" in name:
            digest.update(name.encode() + p.detach().double().numpy().tobytes())
    return {"rank": acc.process_index, "num_processes": acc.num_processes,
            "distributed_type": acc.distributed_type.value,
            "backend": dist.get_backend() if dist.is_initialized() else None, "params_sha256": digest.hexdigest(),
            "losses": log.losses, "steps": len(log.losses), "base_local": local,
            "base_total": sum(p.numel() for p in base)}


def main(data: str, out: str, busy: str) -> None:
    from crma.cli import main as crma

    torch.set_num_threads(1)
    record = {"ddp": train(data, fsdp=False), "fsdp": train(data, fsdp=True)}   # ddp first: --fsdp is for good
    err = io.StringIO()
    with contextlib.redirect_stderr(err):           # last: a finished command leaves the process group
        record["bad_out"] = {"rc": crma(["run", "--model", "tiny:llama", "--domains", f"up={data}", "--epochs", "1",
                                         "--max-len", "48", "--device", "cpu", "--out", busy]),
                             "stderr": err.getvalue()}
    Path(out, f"rank{record['ddp']['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    from crma import runtime

    main(*sys.argv[1:4])
    runtime.exit_launched(0)              # as `python -m crma` ends a launched process
