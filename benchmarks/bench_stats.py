"""Summary figures the benchmark scripts share."""
from __future__ import annotations

import numpy as np


def pct(values, q: float) -> float | None:
    """The q-quantile (0 <= q <= 1) of `values` with linear interpolation between order statistics
    (x_(lo) + (x_(hi) - x_(lo)) (k - lo), k = (n - 1) q: numpy's default); None for no values."""
    return float(np.percentile(list(values), 100 * q)) if len(values) else None
