"""The statistics the router is built from, as pure functions of tensors: k-means, moments, shrunk
precisions (OAS), quadratic forms and LDA scores, quantiles. No state, no files (crma/routing/router.py
holds the router that uses them)."""
from __future__ import annotations

import math

import torch


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """k centres minimising sum_i min_j ||x_i - p_j||^2; x (n, dim) -> (min(k, n), dim).

    Deterministic: k-means++ seeding from a fixed generator, then Lloyd steps."""
    x = x.double()
    k = min(k, x.shape[0])
    gen = torch.Generator().manual_seed(seed)
    centers = [x[int(torch.randint(x.shape[0], (1,), generator=gen))]]
    for _ in range(1, k):
        dist = torch.cdist(x, torch.stack(centers)).min(-1).values ** 2            # (n,)
        probs = dist / dist.sum() if dist.sum() > 0 else torch.full_like(dist, 1 / len(dist))
        centers.append(x[int(torch.multinomial(probs, 1, generator=gen))])
    p = torch.stack(centers)                                                       # (k, dim)
    for _ in range(iters):
        assign = torch.cdist(x, p).argmin(-1)                                      # (n,)
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else p[j] for j in range(k)])
        if torch.equal(new, p):
            break
        p = new
    return p


def oas_shrinkage(cov: torch.Tensor, n: float) -> float:
    """Oracle-approximating shrinkage intensity (Chen et al. 2010) of a (dim, dim) sample covariance of
    n samples: needs only C and n, so it stays exact for merged statistics."""
    p = cov.shape[0]
    tr = float(torch.trace(cov))
    tr2 = float((cov * cov).sum())
    num = (1 - 2 / p) * tr2 + tr * tr
    den = (n + 1 - 2 / p) * (tr2 - tr * tr / p)
    return 1.0 if den <= 0 else min(1.0, max(0.0, num / den))


def shrunk_precision(cov: torch.Tensor, s: float) -> torch.Tensor:
    """((1 - s) C + s tr(C)/dim I)^-1 for a (dim, dim) covariance, in float64."""
    dim = cov.shape[0]
    eye = torch.eye(dim, dtype=torch.float64)
    target = float(torch.trace(cov)) / dim
    sigma = (1 - s) * cov.double() + s * max(target, 1e-12) * eye
    return torch.linalg.inv(sigma + 1e-9 * max(target, 1e-12) * eye)


def quad_form(x: torch.Tensor, mu: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """(x - mu)^T P (x - mu) / dim for rows of x (n, dim) -> (n,)."""
    z = x - mu                                                                     # (n, dim)
    return ((z @ prec) * z).sum(-1) / x.shape[1]


def moments(x: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(n, mean, unbiased covariance) of rows of x, float64."""
    x = x.double()
    mu = x.mean(0)
    z = x - mu
    return float(x.shape[0]), mu, z.T @ z / max(1, x.shape[0] - 1)


def quantile(values: torch.Tensor, q: float) -> float:
    """The q-quantile of a 1-d tensor (linear interpolation), as a float."""
    return float(torch.quantile(values.double(), q))


def lda_scores(x: torch.Tensor, means: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """-1/2 (x - mu_c)^T P (x - mu_c) / dim for rows of x (n, dim) and means (C, dim) -> (n, C)."""
    z = x @ prec                                                               # (n, dim)
    quad = (z * x).sum(-1, keepdim=True) - 2 * z @ means.T + ((means @ prec) * means).sum(-1)[None]
    return -0.5 * quad / x.shape[1]


def quantile_summary(values: list[float]) -> dict:
    """p50 / p95 / mean of a list (for latencies)."""
    if not values:
        return {"p50": math.nan, "p95": math.nan, "mean": math.nan, "n": 0}
    t = torch.tensor(values, dtype=torch.float64)
    return {"p50": float(torch.quantile(t, 0.5)), "p95": float(torch.quantile(t, 0.95)),
            "mean": float(t.mean()), "n": len(values)}
