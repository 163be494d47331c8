"""The CRMA backbone on real tiny models of every family: identity at init, the bound, persistence."""
import pytest
import torch

from crma.config import CRMAConfig
from crma.method.backbone import CRMABackbone, FingerprintError
from crma.method.layer import CRMABlock, orthonormal_columns
from crma.method.models import load_model

from .conftest import FAMILIES

IDS = torch.tensor([[10, 20, 30, 40, 50, 60, 70, 80], [5, 6, 7, 8, 9, 10, 11, 12]])


def randomize(backbone: CRMABackbone, seed: int = 0, gate: float = 3.0) -> None:
    """Move every backbone parameter far from init, as training might."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in backbone.crma_blocks:
            block.crma_theta.add_(torch.randn(block.crma_theta.shape, generator=g))
            block.crma_gate.fill_(gate)
            block.crma_read.copy_(torch.randn(block.crma_read.shape, generator=g))
            block.crma_write.copy_(torch.randn(block.crma_write.shape, generator=g))


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_init_every_family(family):
    model, _ = load_model(f"tiny:{family}")
    with torch.no_grad():
        before = model(input_ids=IDS).logits
        CRMABackbone.for_model(model, CRMAConfig()).attach(model)
        after = model(input_ids=IDS).logits
    assert (after - before).abs().max().item() <= 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_randomized_backbone_changes_output_and_bypass_restores_it(family):
    model, _ = load_model(f"tiny:{family}")
    with torch.no_grad():
        base = model(input_ids=IDS).logits
        backbone = CRMABackbone.for_model(model, CRMAConfig()).attach(model)
        randomize(backbone)
        mixed = model(input_ids=IDS).logits
        with backbone.bypassed():
            bypassed = model(input_ids=IDS).logits
    assert (mixed - base).abs().max() > 1e-4          # the hooks really act on every family
    assert torch.equal(bypassed, base)


@pytest.mark.parametrize("rho", [0.05, 0.1, 0.5, 1.0])
def test_relative_update_bound_per_token(rho):
    block = CRMABlock(64, CRMAConfig(rho=rho), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        block.crma_theta.copy_(torch.randn(4, 4, generator=g) * 4)
        block.crma_gate.fill_(10.0)           # tanh saturates: |alpha| -> rho
        block.crma_read.copy_(torch.randn(64, 4, generator=g))
        block.crma_write.copy_(torch.randn(64, 4, generator=g))
        h = torch.randn(3, 17, 64, generator=g) * 50
        dh = block.delta(h)
    ratio = dh.norm(dim=-1) / h.norm(dim=-1)          # (3, 17): one per token
    assert ratio.max().item() <= rho * (1 + 1e-5)
    assert ratio.max().item() > 0.01 * rho            # and the update is not trivially zero


def test_parameter_count_names_and_orthonormality():
    cfg = CRMAConfig(n_streams=4)
    block = CRMABlock(64, cfg, generator=torch.Generator().manual_seed(0))
    assert sum(p.numel() for p in block.parameters()) == 2 * 4 * 64 + 4 * 4 + 1
    assert all(name.startswith("crma_") for name, _ in block.named_parameters())
    q = orthonormal_columns(torch.randn(64, 4))
    assert torch.allclose(q.T @ q, torch.eye(4), atol=1e-5)


def test_gradient_reaches_gate_first_then_everything():
    block = CRMABlock(16, CRMAConfig(), generator=torch.Generator().manual_seed(0))
    h = torch.randn(5, 16)
    (block(h) ** 2).sum().backward()
    assert block.crma_gate.grad.abs() > 0
    assert block.crma_theta.grad.abs().sum() == 0     # alpha = 0 at init
    block.zero_grad()
    with torch.no_grad():
        block.crma_gate.fill_(0.5)
    (block(h) ** 2).sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in block.parameters())


def test_param_groups_have_separate_learning_rates():
    model, _ = load_model("tiny:llama")
    cfg = CRMAConfig(lr_theta=0.3, lr_gate=0.2, lr_rw=0.1)
    groups = {g["name"]: g for g in CRMABackbone.for_model(model, cfg).param_groups()}
    assert {k: g["lr"] for k, g in groups.items()} == {"crma_theta": 0.3, "crma_gate": 0.2, "crma_rw": 0.1}
    assert len(groups["crma_rw"]["params"]) == 2 * model.config.num_hidden_layers


def test_save_load_round_trip_gives_equal_logits(tmp_path):
    model, _ = load_model("tiny:qwen2")
    backbone = CRMABackbone.for_model(model, CRMAConfig(rho=0.3)).attach(model)
    randomize(backbone, seed=3, gate=0.7)
    path = backbone.save(tmp_path)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    fresh, _ = load_model("tiny:qwen2")
    loaded = CRMABackbone.load(tmp_path, fresh).attach(fresh)
    with torch.no_grad():
        got = fresh(input_ids=IDS).logits
    assert torch.equal(got, expected)
    assert loaded.cfg.rho == 0.3
    assert not list(tmp_path.glob("*.tmp"))           # atomic write left no temp file
    assert path.name == "crma_backbone.safetensors"


def test_loading_onto_a_different_base_model_fails_clearly(tmp_path):
    model, _ = load_model("tiny:llama", seed=0)
    CRMABackbone.for_model(model, CRMAConfig()).save(tmp_path)
    other, _ = load_model("tiny:llama", seed=1)       # same architecture, other weights
    with pytest.raises(FingerprintError, match="different base model.*weights_bf16_sha256"):
        CRMABackbone.load(tmp_path, other)
    gpt2, _ = load_model("tiny:gpt2")
    with pytest.raises(FingerprintError, match="model_type"):
        CRMABackbone.load(tmp_path, gpt2)
