"""Device smoke test: runs wherever a CUDA GPU is visible, skipped elsewhere (CI on CPU). Identity at init,
the certificate, one modular training step and the fingerprint, on the GPU in its automatic dtype."""
from __future__ import annotations

import pytest
import torch

from crma import runtime
from crma.config import CRMAConfig, DeviceConfig, DomainSpec, TrainConfig
from crma.method.backbone import CRMABackbone
from crma.method.models import fingerprint, load_model

from .conftest import write_cycle_domain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")


def test_gpu_identity_certificate_step_fingerprint(tmp_path):
    from crma.baselines import make_method
    from crma.engine.add import AddSettings, load_spec, train_domain
    from crma.engine.live import LiveModel

    device = DeviceConfig(device="cuda")
    model, _ = runtime.load_placed("tiny:llama", device)
    dtype = runtime.resolve_dtype(device)
    assert next(model.parameters()).device.type == "cuda" and next(model.parameters()).dtype == dtype
    assert fingerprint(model) == fingerprint(load_model("tiny:llama")[0])        # = the CPU fp32 model's

    ids = torch.randint(0, 256, (2, 16), device="cuda")
    with torch.no_grad():
        before = model(input_ids=ids).logits
        backbone = CRMABackbone.for_model(model, CRMAConfig(), seed=0).attach(model)
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)                                            # identity at init
    assert {p.device.type for p in backbone.parameters()} == {"cuda"}
    assert {p.dtype for p in backbone.parameters()} == {torch.float32}

    live = LiveModel.fresh("tiny:llama", "modular", seed=0, device=device)
    data = write_cycle_domain(tmp_path / "up.jsonl", "abcd", 8, 1)
    held = write_cycle_domain(tmp_path / "up-holdout.jsonl", "abcd", 2, 2)
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=4, max_len=48, long_inputs="truncate")   # 8 rows: 2 steps
    dom = load_spec(DomainSpec("up", data, held), live.tokenizer, cfg)
    _, log = train_domain(live, dom, 0, AddSettings(train=cfg), runtime.accelerator(device),
                          make_method(live.condition))
    assert len(log.losses) == 2 and all(torch.isfinite(torch.tensor(log.losses)))
    stats = live.backbone.stats()
    assert max(abs(s["alpha"]) for s in stats) > 0                                # the backbone moved
    for s in stats:                                                              # and stayed certified
        assert s["norm"] <= 1 + 1e-5 and s["row_dev"] < 1e-5 and s["col_dev"] < 1e-5
        assert abs(s["alpha"]) * s["norm"] <= CRMAConfig().rho + 1e-6
