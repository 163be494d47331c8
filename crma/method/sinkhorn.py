"""Sinkhorn projection onto doubly stochastic matrices, with a certified spectral bound.

Pure math, no plumbing. Everything here works on a square matrix of logits of shape (n, n).
"""
from __future__ import annotations

import torch


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Log-domain Sinkhorn: project exp(logits) towards the doubly stochastic matrices.

        log M_0 = logits
        repeat K times:
            log M <- log M - logsumexp_row(log M)     # rows sum to 1
            log M <- log M - logsumexp_col(log M)     # columns sum to 1
        M = exp(log M)

    After the last step the column sums are exact (to float rounding) and the row sums are close.
    Differentiable, fixed iteration count. logits: (n, n) -> M: (n, n).
    """
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"sinkhorn expects a square (n, n) matrix, got shape {tuple(logits.shape)}")
    if iters < 1:
        raise ValueError(f"sinkhorn needs at least 1 iteration, got {iters}")
    log_m = logits
    for _ in range(iters):
        log_m = log_m - torch.logsumexp(log_m, dim=1, keepdim=True)  # (n, n), rows normalised
        log_m = log_m - torch.logsumexp(log_m, dim=0, keepdim=True)  # (n, n), columns normalised
    return log_m.exp()


def certify(m: torch.Tensor) -> torch.Tensor:
    """Rescale M so that its spectral norm is at most 1, whatever Sinkhorn's convergence.

        ||M||_2 <= sqrt(||M||_1 * ||M||_inf) = sqrt(max_col_sum * max_row_sum) =: c
        M_cert = M / max(c, 1)

    For non-negative M the 1- and inf-norms are the max column and row sums, so the bound is exact
    arithmetic, not a statement about convergence. m: (n, n) -> (n, n).
    """
    bound = torch.sqrt(m.sum(dim=0).max() * m.sum(dim=1).max())  # scalar
    return m / torch.clamp(bound, min=1.0)


def mixing_matrix(theta: torch.Tensor, tau: float, iters: int) -> torch.Tensor:
    """The CRMA mixing matrix: M = certify(sinkhorn(Theta / tau, K)). theta: (n, n) -> (n, n)."""
    return certify(sinkhorn(theta / tau, iters))


@torch.no_grad()
def spectral_stats(m: torch.Tensor) -> dict[str, float]:
    """Diagnostics of one mixing matrix (n, n):

        norm       = ||M||_2 (largest singular value)
        norm_dev   = | ||M||_2 - 1 |            (0 for an exactly doubly stochastic M)
        row_dev    = max_i | sum_j M_ij - 1 |
        col_dev    = max_j | sum_i M_ij - 1 |
    """
    m64 = m.detach().double()
    norm = torch.linalg.matrix_norm(m64, ord=2).item()
    return {
        "norm": norm,
        "norm_dev": abs(norm - 1.0),
        "row_dev": (m64.sum(dim=1) - 1).abs().max().item(),
        "col_dev": (m64.sum(dim=0) - 1).abs().max().item(),
    }
