"""Sinkhorn and the certified mixing matrix: properties over random logits and sizes."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crma.config import CRMAConfig
from crma.method.sinkhorn import certify, mixing_matrix, sinkhorn, spectral_stats

DEFAULT = CRMAConfig()


def logits(n, scale, seed):
    return torch.randn(n, n, generator=torch.Generator().manual_seed(seed)) * scale


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 8), scale=st.floats(0.0, 6.0), seed=st.integers(0, 10_000),
       iters=st.integers(1, 40))
def test_certified_bound_holds_for_any_logits_and_any_iteration_count(n, scale, seed, iters):
    m = certify(sinkhorn(logits(n, scale, seed), iters))
    assert (m >= 0).all()
    assert torch.linalg.matrix_norm(m.double(), ord=2) <= 1 + 1e-6
    # after the final column step, column sums are exact (up to the certificate's shrinking)
    assert (m.sum(0) <= 1 + 1e-6).all()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 8), seed=st.integers(0, 10_000), spread=st.floats(0.0, 0.75))
def test_doubly_stochastic_within_1e6_in_the_trained_regime(n, seed, spread):
    """Theta near its init (theta_init * I plus perturbations up to +-0.75): sums within 1e-6 of 1."""
    noise = (torch.rand(n, n, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * spread
    theta = DEFAULT.theta_init * torch.eye(n) + noise
    m = mixing_matrix(theta, DEFAULT.tau, DEFAULT.sinkhorn_iters)
    stats = spectral_stats(m)
    assert stats["row_dev"] <= 1e-6 and stats["col_dev"] <= 1e-6
    assert stats["norm_dev"] <= 1e-6          # doubly stochastic => ||M||_2 == 1


def test_converged_matrix_has_unit_spectral_norm_and_identity_is_fixed():
    m = sinkhorn(torch.zeros(4, 4), 5)
    assert torch.allclose(m, torch.full((4, 4), 0.25))
    assert abs(spectral_stats(m)["norm"] - 1) < 1e-6


def test_certify_shrinks_an_unconverged_matrix():
    m = torch.tensor([[2.0, 0.0], [0.0, 0.5]])      # row/col sums up to 2: norm 2
    c = certify(m)
    assert torch.linalg.matrix_norm(c, ord=2) <= 1 + 1e-7
    assert torch.allclose(c, m / 2)


def test_sinkhorn_is_differentiable():
    theta = torch.randn(4, 4, requires_grad=True)
    (mixing_matrix(theta, 1.0, 10) * torch.randn(4, 4)).sum().backward()
    assert theta.grad is not None and theta.grad.abs().sum() > 0


def test_bad_shapes_and_iterations_are_rejected():
    import pytest
    with pytest.raises(ValueError, match="square"):
        sinkhorn(torch.zeros(3, 4), 5)
    with pytest.raises(ValueError, match="iteration"):
        sinkhorn(torch.zeros(3, 3), 0)
