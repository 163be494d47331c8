"""The CRMA module: one Constrained Residual Mixing Adapter for one decoder block (docs/method.md section 2).

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


def fp32(h: torch.Tensor):
    """Context: autocast off, so CRMA computes in fp32 even inside a bf16/fp16 autocast region.

    Why fp32 whatever the model's dtype: bf16 keeps 8 mantissa bits, so Sinkhorn's row and column sums
    would be exact only to ~4e-3 and ||M||_2 could exceed 1 by as much; the certificate
    ||alpha W M R||_2 <= rho (||dh|| <= rho ||h|| per token) and the spectral log need fp32. The cost is
    negligible: n (4-64) streams against a hidden size in the thousands."""
    return torch.autocast(device_type=h.device.type, enabled=False)


def orthonormal_columns(a: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR decomposition a = Q U: (d, n) -> (d, n) with Q^T Q = I_n.

    The signs are fixed so that diag(U) >= 0, which makes Q a smooth function of a and
    Q == a whenever a already has orthonormal columns.
    """
    q, u = torch.linalg.qr(a, mode="reduced")                 # (d, n), (n, n)
    signs = torch.sign(torch.diagonal(u))                     # (n,)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs                                          # (d, n)


def crma_operators(read: torch.Tensor, theta: torch.Tensor, write: torch.Tensor, gate: torch.Tensor,
                   cfg: CRMAConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pieces `CRMABlock.delta` computes on every forward, from one set of block parameters:
    (R^T (d, n), M^T (n, n), W^T (n, d), alpha ())."""
    r_t = orthonormal_columns(read)                                   # (d, n) = R^T
    w_t = orthonormal_columns(write).T                                # (n, d) = W^T
    m_t = mixing_matrix(theta, cfg.tau, cfg.sinkhorn_iters).T         # (n, n) = M^T
    return r_t, m_t, w_t, cfg.rho * torch.tanh(gate)


def folded_operators(read: torch.Tensor, theta: torch.Tensor, write: torch.Tensor, gate: torch.Tensor,
                  cfg: CRMAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """crma_operators folded into the two factors of dh = (alpha W)(M R) h, for serving:
    (R^T M^T (d, n), alpha W^T (n, d)). The same map as CRMABlock.delta (rounding aside)."""
    r_t, m_t, w_t, alpha = crma_operators(read, theta, write, gate, cfg)
    return r_t @ m_t, alpha * w_t


def delta_rows(h: torch.Tensor, read_mix: torch.Tensor, write_scaled: torch.Tensor) -> torch.Tensor:
    """dh_b = (alpha_b W_b)(M_b R_b) h_b for every batch row b with its own operators: h (b, ..., d),
    read_mix (b, d, n) = (M_b R_b)^T, write_scaled (b, n, d) = (alpha_b W_b)^T (folded_operators
    stacked per row). Computed on h.float() (the caller keeps autocast off: `fp32`); returns (b, ..., d)
    in h's dtype."""
    shape = h.shape
    x = h.float().reshape(shape[0], -1, shape[-1])                    # (b, s, d)
    out = torch.bmm(torch.bmm(x, read_mix), write_scaled)             # (b, s, n) -> (b, s, d)
    return out.reshape(shape).to(h.dtype)


class CRMABlock(nn.Module):
    """CRMA for one decoder block: h (..., d) -> h + alpha * W M R h. Computes in fp32.

    `row_operators` (None unless set by CRMABackbone.per_row, for serving) holds per-row operators
    (see delta_rows): each batch row then gets its own backbone version's parameters."""

    row_operators: tuple[torch.Tensor, ...] | None = None

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
        """dh = alpha * W M R h for h of shape (..., d); returns (..., d) in h's dtype, computed in fp32."""
        with fp32(h):
            read = orthonormal_columns(self.crma_read)      # (d, n) = R^T
            write = orthonormal_columns(self.crma_write)    # (d, n) = W
            streams = h.float() @ read                      # (..., n) = R h
            mixed = streams @ self.mixing().T               # (..., n) = M R h
            out = self.alpha() * (mixed @ write.T)          # (..., d)
        return out.to(h.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.row_operators is not None:
            with fp32(h):
                return h + delta_rows(h, *self.row_operators)
        return h + self.delta(h)

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Spectral diagnostics of this block: ||M||_2, row/col-sum deviation, alpha."""
        out = spectral_stats(self.mixing())
        out["alpha"] = float(self.alpha())
        return out
