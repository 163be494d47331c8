"""Scale-out (crma/runtime.py): device and dtype settings, bf16 with fp32 CRMA, gradient checkpointing,
micro-batches, and data-parallel training on 2 real CPU processes (gloo) through `accelerate launch`."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from crma import runtime
from crma.cli import main
from crma.config import ConfigError, CRMAConfig, DeviceConfig, DomainSpec, TrainConfig
from crma.data import text_example
from crma.method.models import fingerprint, load_model

from .conftest import write_cycle_domain

ROOT = Path(__file__).resolve().parents[1]
# In-process tests use DeviceConfig() (auto): a process has one device (runtime.accelerator), so they run on
# the CPU here and on the GPU where one is visible; the launched tests pin --device cpu (gloo) themselves.


def test_device_settings_are_validated_and_resolved():
    with pytest.raises(ConfigError, match="device: must be one of auto, cpu, cuda, mps"):
        DeviceConfig(device="tpu")
    with pytest.raises(ConfigError, match="dtype: must be one of"):
        DeviceConfig(dtype="float16")
    if not torch.cuda.is_available():
        assert runtime.resolve_device(DeviceConfig()) == "cpu"
        assert runtime.resolve_dtype(DeviceConfig()) == torch.float32           # auto on CPU: fp32
        with pytest.raises(ConfigError, match="--device cuda: no CUDA device"):
            runtime.resolve_device(DeviceConfig(device="cuda"))
    assert runtime.resolve_dtype(DeviceConfig(device="cpu", dtype="bfloat16")) == torch.bfloat16


def test_4bit_and_fsdp_are_refused_clearly_where_they_cannot_run():
    from crma.method.models import ModelError, quantization_kwargs

    with pytest.raises(ModelError, match="applies to hub or local models"):
        load_model("tiny:llama", load_in_4bit=True)
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="bitsandbytes"):          # not installed, or no CUDA GPU
            quantization_kwargs(True, torch.bfloat16)
    with pytest.raises(ConfigError, match="fsdp: cannot shard 4-bit"):
        DeviceConfig(fsdp=True, load_in_4bit=True)
    with pytest.raises(ConfigError, match="--fsdp shards the base model across processes"):
        runtime.load_placed("tiny:llama", DeviceConfig(fsdp=True))     # one process: nothing to shard across


def test_fingerprint_is_the_same_in_fp32_and_bf16_and_differs_between_models():
    fp32, _ = load_model("tiny:llama", seed=0)
    bf16, _ = load_model("tiny:llama", seed=0, dtype=torch.bfloat16)
    other, _ = load_model("tiny:llama", seed=1, dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert fingerprint(fp32) == fingerprint(bf16)        # a store built on CPU in fp32 opens in bf16 on a GPU
    assert fingerprint(other) != fingerprint(bf16)


def test_crma_stays_fp32_and_certified_on_a_bf16_model(conflicting_domains, tmp_path):
    """A whole modular run with bf16 base weights: backbone parameters stay fp32, the certificate and
    the doubly-stochastic sums hold at fp32 precision, and CRMA ignores an enclosing bf16 autocast."""
    from crma.engine.live import LiveModel
    from crma.engine.run import continual_run

    from .conftest import tiny_run_config

    cfg = tiny_run_config(conflicting_domains, tmp_path / "bf16", "modular", epochs=1)
    cfg.device = DeviceConfig(dtype="bfloat16")          # this process's device (cpu here, a GPU where present)
    res = continual_run(cfg, progress=False)
    assert res["runtime"]["resolved_dtype"] == "bfloat16"
    s = res["spectral"]
    assert s["certificate_ok"] and s["max_sum_dev"] < 1e-5 and s["max_norm_dev"] < 1e-5 and s["max_alpha"] > 0
    assert res["gain_pct"][0] > 0 and res["drift_pct_pinned"] == 0.0
    live = LiveModel.open(__import__("crma.store", fromlist=["Store"]).Store(cfg.out),
                          device=DeviceConfig(dtype="bfloat16"))
    assert next(live.model.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in live.backbone.parameters()} == {torch.float32}
    block = live.backbone.crma_blocks[0]
    h = torch.randn(2, 5, block.crma_read.shape[0]).to(torch.bfloat16).to(block.crma_read.device)
    plain = block.delta(h)
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        inside = block.delta(h)
    assert plain.dtype == torch.bfloat16 and torch.equal(plain, inside)
    bound = block.cfg.rho * h.float().norm(dim=-1)
    assert bool((plain.float().norm(dim=-1) <= bound * 1.01 + 1e-3).all())    # ||dh|| <= rho ||h|| (bf16 output)


def _one_step_grads(gradient_checkpointing: bool, spec: str = "tiny:llama") -> dict[str, torch.Tensor]:
    from crma.config import LoraSettings
    from crma.engine.train import token_loss_sum
    from crma.method.adapters import add_adapter, set_trainable
    from crma.method.backbone import CRMABackbone

    model, _ = runtime.load_placed(spec, DeviceConfig(gradient_checkpointing=gradient_checkpointing))
    assert model.is_activation_checkpointing == gradient_checkpointing
    backbone = CRMABackbone.for_model(model, CRMAConfig(), seed=0).attach(model)
    with torch.no_grad():
        for b in backbone.crma_blocks:
            b.crma_gate.fill_(0.5)                     # a live backbone, so its gradients are not trivially 0
    torch.manual_seed(0)
    model = add_adapter(model, "up", LoraSettings())
    set_trainable(model, "up", backbone=True)
    model.train()
    rows = [text_example([(7 * i + 3 * j) % 250 for j in range(20 + i)]) for i in range(3)]
    token_loss_sum(model, rows, 256, next(model.parameters()).device).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, ckpt = _one_step_grads(False), _one_step_grads(True)
    assert plain.keys() == ckpt.keys() and any("crma_" in n for n in plain) and any("lora_" in n for n in plain)
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], rtol=1e-5, atol=1e-7), name
    assert sum(float(g.abs().sum()) for n, g in plain.items() if "crma_" in n) > 0


def test_micro_batches_change_memory_not_the_step(tmp_path):
    """Global batch 5 in micro-batches of 2 (2 + 2 + 1 rows, accumulated) = one forward of 5 rows."""
    from crma.baselines import make_method
    from crma.engine.add import AddSettings, load_spec, train_domain
    from crma.engine.live import LiveModel

    data = write_cycle_domain(tmp_path / "up.jsonl", "abcd", 10, 1)
    held = write_cycle_domain(tmp_path / "up-holdout.jsonl", "abcd", 3, 2)
    out = []
    for micro in (0, 2):
        live = LiveModel.fresh("tiny:llama", "modular", seed=0, device=DeviceConfig())
        cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=5, max_len=48, micro_batch_size=micro,
                          long_inputs="truncate")           # one example per passage: 10 rows, 2 steps of 5
        dom = load_spec(DomainSpec("up", str(data), str(held)), live.tokenizer, cfg)
        _, log = train_domain(live, dom, 0, AddSettings(train=cfg), runtime.accelerator(), make_method(live.condition))
        out.append((log.losses, {n: p.detach().clone() for n, p in live.model.named_parameters()
                                 if "crma_" in n or "lora_" in n}))
    (l0, p0), (l2, p2) = out
    assert len(l0) == 2 and l0 == pytest.approx(l2, rel=1e-5)
    for name in p0:
        assert torch.allclose(p0[name], p2[name], rtol=1e-4, atol=1e-6), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], env_extra: dict | None = None, processes: int = 2,
            expect_rc: int = 0) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N` (N real processes on CPU) of `args`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    env.pop("ACCELERATE_USE_CPU", None)          # crma itself must ask for the CPU process group
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if processes > 1:
        launcher += ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    else:
        launcher = [sys.executable]
    proc = subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert (proc.returncode == 0) == (expect_rc == 0), proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_two_gloo_processes_train_one_model_and_stop_together(tmp_path):
    """Both processes really form one gloo group of 2 and their parameters agree after training, data-parallel
    (DDP) and with the base sharded (--fsdp: each process holds about half of the base weights); and a bad
    --out found by the main process (which alone writes) stops both with the same clear error, nobody hangs,
    and the folder's file is untouched."""
    data = write_cycle_domain(tmp_path / "up.jsonl", "abcd", 10, 1)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    _launch([str(ROOT / "tests" / "dist_worker.py"), str(data), str(tmp_path), str(busy)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    runs = {mode: [r[mode] for r in ranks] for mode in ("ddp", "fsdp")}
    for mode, (r0, r1) in runs.items():
        assert [r0["num_processes"], r1["num_processes"]] == [2, 2] and {r0["backend"], r1["backend"]} == {"gloo"}
        assert {r0["distributed_type"], r1["distributed_type"]} == {"MULTI_CPU"}
        assert r0["params_sha256"] == r1["params_sha256"], mode
        assert r0["losses"] == r1["losses"] and r0["steps"] == 2
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert all(r["base_local"] == r["base_total"] for r in ddp)                       # DDP: whole base each
    assert sum(r["base_local"] for r in fsdp) == fsdp[0]["base_total"]                # FSDP: split in two
    assert max(r["base_local"] for r in fsdp) < 0.6 * fsdp[0]["base_total"]
    assert fsdp[0]["losses"] == pytest.approx(ddp[0]["losses"], rel=1e-5)
    for r in ranks:                                                                   # the same error on both
        assert r["bad_out"]["rc"] == 2 and r["bad_out"]["stderr"].count("crma run: error: --out: ") == 1
    assert [p.name for p in busy.iterdir()] == ["notes.txt"] and (busy / "notes.txt").read_text() == "keep me"


@pytest.mark.slow                  # end to end, 40-70 s on 2 idle cores (tiny:llama)
def test_two_process_run_matches_one_process_and_one_process_writes(tmp_path):
    """`accelerate launch -m crma run` on 2 processes: the same loss matrices as 1 process with the same
    global batch, every file written by exactly one process (the main one), a store that verifies."""
    from crma.store import Store

    root = tmp_path / "data"
    up = [write_cycle_domain(root / f"up{k}.jsonl", "abcd", n, k) for k, n in ((1, 12), (2, 5))]
    down = [write_cycle_domain(root / f"down{k}.jsonl", "dcba", n, k + 2) for k, n in ((1, 12), (2, 5))]
    common = ["--model", "tiny:llama", "--condition", "modular", "--domains", f"up={up[0]}:{up[1]}",
              f"down={down[0]}:{down[1]}", "--epochs", "1", "--lr", "1e-2", "--batch-size", "5", "--max-len", "48",
              "--long-inputs", "truncate", "--eval-batch-size", "2", "--device", "cpu"]
    log = tmp_path / "writes.log"
    _launch(["-m", "crma", "run", *common, "--out", str(tmp_path / "two")], {"CRMA_WRITE_LOG": str(log)})
    assert main(["run", *common, "--out", str(tmp_path / "one")]) == 0          # one process: this one
    _launch(["-m", "crma", "run", *common, "--fsdp", "--out", str(tmp_path / "fsdp")])
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    fsdp = json.loads((tmp_path / "fsdp" / "results.json").read_text())
    assert fsdp["runtime"]["fsdp"] and fsdp["runtime"]["num_processes"] == 2
    for key in ("base_loss", "loss_matrix", "loss_matrix_pinned"):                     # sharded base: same run
        assert torch.allclose(torch.tensor(fsdp[key]), torch.tensor(one[key]), rtol=1e-4), key
    assert two["runtime"]["num_processes"] == 2 and one["runtime"]["num_processes"] == 1
    assert json.loads((tmp_path / "two" / "config.json").read_text())["runtime"]["distributed_type"] == "MULTI_CPU"
    for key in ("base_loss", "loss_matrix", "loss_matrix_pinned"):
        assert torch.allclose(torch.tensor(two[key]), torch.tensor(one[key]), rtol=1e-4), key
    assert two["phases"][0]["steps"] == one["phases"][0]["steps"] == 3                  # 12 passages / 5
    assert two["loss_curves"][0] == pytest.approx(one["loss_curves"][0], rel=1e-4)
    writes = [line.split(" ", 1) for line in log.read_text().splitlines()]
    assert len({pid for pid, _ in writes}) == 1                                          # one writer process
    counts = Counter(path for _, path in writes)
    assert counts[str((tmp_path / "two" / "results.json").resolve())] == 2               # once per phase
    assert counts[str((tmp_path / "two" / "config.json").resolve())] == 1
    assert any("/adapters/up/v1" in p for p in counts) and any("/backbone/v2" in p for p in counts)
    assert all(n == 1 for p, n in counts.items() if "/v" in p.rsplit("/", 1)[-1][:2])     # version folders once
    Store(tmp_path / "two").verify()

    # `crma add` under 2 processes onto that store: one writer again, and the store loads and verifies
    side = write_cycle_domain(root / "side.jsonl", "aabb", 12, 9)
    log.unlink()
    _launch(["-m", "crma", "add", "--store", str(tmp_path / "two"), "--domain", "side", "--data", str(side),
             "--epochs", "1", "--lr", "1e-2", "--batch-size", "5", "--max-len", "48", "--device", "cpu"],
            {"CRMA_WRITE_LOG": str(log)})
    writes = [line.split(" ", 1) for line in log.read_text().splitlines()]
    assert len({pid for pid, _ in writes}) == 1 and any("/adapters/side/v1" in p for _, p in writes)
    store = Store(tmp_path / "two")
    store.verify()
    assert store.domains() == ["up", "down", "side"] and store.backbone_version("side", "pinned") == 3
