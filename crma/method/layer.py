"""The CRMA module: one Constrained Residual Mixing Adapter for one decoder block (DESIGN.md s.2).

    M     = certify(sinkhorn(Theta / tau, K))     # (n, n), doubly stochastic, ||M||_2 <= 1
    alpha = rho * tanh(a)                          # |alpha| <= rho, a = 0 at init
    dh    = alpha * W @ M @ R @ h                  # R: (n, d) orthonormal rows, W: (d, n) orthonormal cols
    h'    = h + dh

Since ||W M R||_2 <= ||W||_2 ||M||_2 ||R||_2 <= 1, every token satisfies ||dh|| <= rho * ||h||.
Pure math: no I/O, no knowledge of transformers.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import CRMAConfig
from .sinkhorn import mixing_matrix, spectral_stats


def orthonormal_columns(a: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR decomposition a = Q U: (d, n) -> (d, n) with Q^T Q = I_n.

    The signs are fixed so that diag(U) >= 0, which makes Q a smooth function of a and
    Q == a whenever a already has orthonormal columns.
    """
    q, u = torch.linalg.qr(a, mode="reduced")                 # (d, n), (n, n)
    signs = torch.sign(torch.diagonal(u))                     # (n,)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs                                          # (d, n)


class CRMABlock(nn.Module):
    """CRMA for one decoder block: h (..., d) -> h + alpha * W M R h. Computes in fp32."""

    def __init__(self, d: int, cfg: CRMAConfig, basis: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        n = cfg.n_streams
        if n > d:
            raise ValueError(f"crma.n_streams={n} exceeds the hidden size d={d}")
        self.cfg = cfg
        if basis is None:  # random orthonormal basis of an n-dim subspace
            basis = torch.randn(d, n, generator=generator)
        basis = orthonormal_columns(basis.float()[:, :n])                          # (d, n)
        self.crma_theta = nn.Parameter(cfg.theta_init * torch.eye(n))               # (n, n)
        self.crma_gate = nn.Parameter(torch.zeros(()))                              # scalar a
        self.crma_read = nn.Parameter(basis.clone())                                # (d, n), R = Q(read)^T
        self.crma_write = nn.Parameter(basis.clone())                               # (d, n), W = Q(write)

    def mixing(self) -> torch.Tensor:
        """M = certify(sinkhorn(Theta / tau, K)): (n, n)."""
        return mixing_matrix(self.crma_theta, self.cfg.tau, self.cfg.sinkhorn_iters)

    def alpha(self) -> torch.Tensor:
        """alpha = rho * tanh(a): scalar with |alpha| <= rho."""
        return self.cfg.rho * torch.tanh(self.crma_gate)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """dh = alpha * W M R h for h of shape (..., d); returns (..., d) in h's dtype."""
        read = orthonormal_columns(self.crma_read)      # (d, n) = R^T
        write = orthonormal_columns(self.crma_write)    # (d, n) = W
        streams = h.float() @ read                      # (..., n) = R h
        mixed = streams @ self.mixing().T               # (..., n) = M R h
        return (self.alpha() * (mixed @ write.T)).to(h.dtype)   # (..., d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h)

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Spectral diagnostics of this block: ||M||_2, row/col-sum deviation, alpha."""
        out = spectral_stats(self.mixing())
        out["alpha"] = float(self.alpha())
        return out
