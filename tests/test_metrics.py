"""Forgetting metrics against hand-computed values (docs/method.md section 4)."""
import pytest

from crma.engine import metrics

# after phase 0: domain 0 at 2.0; after phase 1: domain 0 rose to 2.5, domain 1 trained to 1.0
L = [[2.0, 4.0], [2.5, 1.0]]
BASE = [4.0, 5.0]


def test_drift_gain_bwt():
    assert metrics.per_domain_drift(L) == [25.0]          # 100 * (2.5 - 2.0) / 2.0
    assert metrics.drift(L) == 25.0
    assert metrics.gain(BASE, L) == [50.0, 80.0]          # (4-2)/4, (5-1)/5
    assert metrics.bwt(L) == -0.5                         # 2.0 - 2.5: negative = forgot
    assert metrics.drift([[1.0]]) is None and metrics.bwt([[1.0]]) is None


def test_learning_advantage_prior_and_all():
    frozen = [[2.0, 4.0], [2.0, 1.0]]
    modular = [[1.9, 4.0], [1.8, 0.9]]
    assert metrics.learning_advantage(modular, frozen) == pytest.approx(10.0)          # (2-1.8)/2
    assert metrics.learning_advantage(modular, frozen, prior_only=False) == pytest.approx(10.0)
    assert metrics.learning_advantage(frozen, modular) == pytest.approx(-100 * 0.2 / 1.8)


def test_wilson_interval_matches_the_paper_example():
    # 18/18: Wilson gives [82.4%, 100%]. The paper quotes "Wilson [81.5%, 100%]", which is the
    # Clopper-Pearson exact bound 0.025 ** (1 / 18) = 0.8153, not Wilson.
    lo, hi = metrics.wilson(18, 18)
    assert lo == pytest.approx(18 / (18 + 1.959963984540054 ** 2)) and round(lo * 100, 1) == 82.4
    assert hi == 1.0
    lo, hi = metrics.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert metrics.wilson(0, 0) == (0.0, 1.0)


def test_retention_seed_stats_disjoint():
    assert metrics.retained([1.0, 1.0, 2.0], [1.005, 1.02, 1.5]) == 2
    s = metrics.seed_stats([1.0, 2.0, 3.0])
    assert (s["mean"], s["sd"], s["min"], s["max"]) == (2.0, 1.0, 1.0, 3.0)
    assert metrics.ranges_disjoint([40, 45], [-0.3, 0.1]) and not metrics.ranges_disjoint([1, 3], [2, 4])
