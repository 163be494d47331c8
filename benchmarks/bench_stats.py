"""Summary figures and result files the benchmark scripts share."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crma.io import write_text  # noqa: E402


def pct(values, q: float) -> float | None:
    """The q-quantile (0 <= q <= 1) of `values` with linear interpolation between order statistics
    (x_(lo) + (x_(hi) - x_(lo)) (k - lo), k = (n - 1) q: numpy's default); None for no values."""
    return float(np.percentile(list(values), 100 * q)) if len(values) else None


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine(threads: int, load_before: list[float]) -> dict:
    """The machine a timing ran on: threads, CPUs, load average before and now, and whether other work
    was running (load before the run, or after it beyond the run's own threads): not a final figure then."""
    load_after = load_average()
    return {"threads": threads, "cpus": os.cpu_count(), "load_before": load_before, "load_after": load_after,
            "loaded": load_before[0] > 0.5 or load_after[0] > threads + 0.5,
            "platform": platform.platform(), "processor": platform.processor()}


def load_line(m: dict) -> str:
    """The report's line on the load, labelled when the machine was not idle."""
    return (f"Load average before/after: {m['load_before']} / {m['load_after']}"
            + (" — **not an idle machine: these are not final figures**" if m["loaded"] else ""))


def write_results(out: Path, res: dict, report: str) -> None:
    """OUT.json (res) and OUT.md (report), each written atomically; the report is printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out.with_suffix(".json"), json.dumps(res, indent=1) + "\n")
    write_text(out.with_suffix(".md"), report)
    print(report)
