"""Forgetting metrics (docs/method.md section 4). Pure functions of loss matrices; no I/O.

L[i][j]: holdout loss of domain j after phase i (T phases). Lbase[j]: untouched base model.
Positive drift = forgetting.
"""
from __future__ import annotations

import math
from statistics import mean, stdev

Matrix = list[list[float]]


def per_domain_drift(L: Matrix) -> list[float]:
    """drift_j = 100 * (L[T-1][j] - L[j][j]) / L[j][j], for prior domains j < T-1."""
    last = len(L) - 1
    return [100.0 * (L[last][j] - L[j][j]) / L[j][j] for j in range(last)]


def drift(L: Matrix) -> float | None:
    """Headline drift: mean of drift_j over prior domains (None with a single domain)."""
    d = per_domain_drift(L)
    return mean(d) if d else None


def gain(base: list[float], L: Matrix) -> list[float]:
    """gain_j = 100 * (Lbase[j] - L[j][j]) / Lbase[j]: how much training domain j helped it."""
    return [100.0 * (base[j] - L[j][j]) / base[j] for j in range(len(L))]


def bwt(L: Matrix) -> float | None:
    """Backward transfer, Lopez-Paz & Ranzato sign: mean_j (L[j][j] - L[T-1][j]), positive = improved."""
    last = len(L) - 1
    return mean(L[j][j] - L[last][j] for j in range(last)) if last else None


def learning_advantage(L_a: Matrix, L_b: Matrix, prior_only: bool = True) -> float | None:
    """Advantage of A over B: 100 * mean_j (L_B[T-1][j] - L_A[T-1][j]) / L_B[T-1][j].

    Over prior domains j < T-1 (prior_only) or over all domains."""
    last = len(L_a) - 1
    cols = range(last if prior_only else last + 1)
    vals = [100.0 * (L_b[last][j] - L_a[last][j]) / L_b[last][j] for j in cols]
    return mean(vals) if vals else None


def retained(own: list[float], final: list[float], tolerance: float = 1.01) -> int:
    """Count passages whose loss after the last phase is <= tolerance * their loss right after training."""
    return sum(1 for a, b in zip(own, final, strict=False) if b <= tolerance * a)


def retention(after_phase: list[list[list[float]]], tolerance: float = 1.01) -> dict:
    """Retention probe over prior domains: after_phase[i][j] = per-passage losses of domain j after phase i.

        k = #{passages p of prior domains j < T-1 : l_p(after phase T-1) <= tolerance * l_p(after phase j)}
    Returns {"k", "n", "wilson95"}.
    """
    last = len(after_phase) - 1
    k = sum(retained(after_phase[j][j], after_phase[last][j], tolerance) for j in range(last))
    n = sum(len(after_phase[j][j]) for j in range(last))
    return {"k": k, "n": n, "wilson95": list(wilson(k, n))}


def certificate_ok(max_norm: float, max_alpha_times_norm: float, rho: float, tol: float = 1e-6) -> bool:
    """The spectral certificate held: max ||M||_2 <= 1 and max |alpha| ||M||_2 <= rho (float slack tol)."""
    return max_norm <= 1 + tol and max_alpha_times_norm <= rho * (1 + tol)


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for k successes out of n:

        centre = (p + z^2/2n) / (1 + z^2/n),  half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    """
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def seed_stats(values: list[float]) -> dict:
    """Across seeds: mean, sample sd (n-1), per-seed values, [min, max]."""
    vals = [float(v) for v in values]
    return {"mean": mean(vals) if vals else None,
            "sd": stdev(vals) if len(vals) > 1 else 0.0 if vals else None,
            "values": vals, "min": min(vals) if vals else None, "max": max(vals) if vals else None}


def ranges_disjoint(a: list[float], b: list[float]) -> bool:
    """True when the [min, max] ranges of two sets of per-seed values do not overlap."""
    return bool(a and b) and (max(a) < min(b) or max(b) < min(a))
