"""Worker of tests/test_scale.py, started by `accelerate launch --num_processes 2`: trains one modular phase
(tiny:llama, global batch 5 so the shares are 3 and 2 rows, micro-batches of 2) and writes, per process,
what the process group was and a checksum of every trainable parameter after training.

    accelerate launch --multi_gpu --num_processes 2 tests/dist_worker.py DATA.jsonl OUT_DIR [--fsdp]

With --fsdp the base model is sharded: each process also reports how many base weights it holds.
"""
import hashlib
import json
import sys
from pathlib import Path

import torch


def main(data: str, out: str, fsdp: bool = False) -> None:
    import torch.distributed as dist

    from crma import runtime
    from crma.baselines import make_method
    from crma.config import CRMAConfig, DeviceConfig, DomainSpec, TrainConfig
    from crma.engine.add import AddSettings, load_domain, train_domain
    from crma.engine.live import LiveModel

    torch.set_num_threads(1)
    device = DeviceConfig(device="cpu", fsdp=fsdp)
    acc = runtime.accelerator(device)
    live = LiveModel.fresh("tiny:llama", "modular", seed=0, device=device)
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=5, max_len=48, micro_batch_size=2, max_passages=10)
    dom = load_domain(DomainSpec("up", Path(data)), live.tokenizer, cfg)
    adapter, log = train_domain(live, dom, 0, AddSettings(train=cfg, crma=CRMAConfig()), acc,
                                make_method(live.condition))
    base = [p for n, p in live.model.named_parameters() if "lora_" not in n and "crma_" not in n]
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in base)
    digest = hashlib.sha256()
    for name, p in sorted(live.model.named_parameters()):
        if "lora_" in name or "crma_" in name:
            digest.update(name.encode() + p.detach().double().numpy().tobytes())
    Path(out, f"rank{acc.process_index}.json").write_text(json.dumps({
        "rank": acc.process_index, "num_processes": acc.num_processes, "distributed_type": acc.distributed_type.value,
        "backend": dist.get_backend() if dist.is_initialized() else None, "params_sha256": digest.hexdigest(),
        "losses": log.losses, "steps": len(log.losses), "base_local": local,
        "base_total": sum(p.numel() for p in base)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--fsdp" in sys.argv[3:])
