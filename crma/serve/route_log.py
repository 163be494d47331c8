"""`crma route-log FILE`: what the router did with real traffic, from the routing log (crma/serve/telemetry.py).

    per domain served: requests, share, mean router confidence
    `auto` requests the router sent to base, by reason (characters, background, distance)
    low-confidence requests (confidence < --low-confidence): which domains they went to and what came second

so an operator can see what the router gets wrong and give those domains example queries
(`crma add --route-examples`). Rotated files (FILE.1, FILE.2, ...) are read too, oldest first.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..config import ConfigError
from ..data.sources import read_json


def log_files(path: Path) -> list[Path]:
    path = Path(path)
    rotated = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit()
                     else 0)
    files = [p for p in rotated if p.suffix[1:].isdigit()] + ([path] if path.exists() else [])
    if not files:
        raise ConfigError(f"{path}: no routing log (crma serve --route-log FILE writes one)")
    return files


def read_records(path: Path) -> list[dict]:
    """Every line of the log and its rotated files, oldest first (DataError naming file:line for a bad one)."""
    return [row for file in log_files(path) for row in read_json(file).rows]


def summarise(records: list[dict], low: float = 0.6) -> dict:
    """Counts over the routing log's records (see the module docstring)."""
    served = Counter(r.get("domain") or "-" for r in records)
    auto = [r for r in records if r.get("model") == "auto"]
    abstained = Counter(r.get("reason") or "?" for r in auto if r.get("domain") == "base")
    lows = [r for r in auto if r.get("confidence") is not None and r["confidence"] < low and r.get("domain") != "base"]
    conf: dict[str, list[float]] = {}
    for r in auto:
        if r.get("confidence") is not None:
            conf.setdefault(r.get("domain") or "-", []).append(r["confidence"])
    return {"requests": len(records), "auto": len(auto),
            "status": dict(Counter(str(r.get("status")) for r in records)),
            "served": {d: {"requests": n, "share": n / len(records),
                           "mean_confidence": sum(conf[d]) / len(conf[d]) if d in conf else None}
                       for d, n in served.most_common()},
            "abstained": dict(abstained), "low_confidence_threshold": low, "low_confidence": len(lows),
            "low_confidence_pairs": dict(Counter(f"{r['domain']} (runner-up {r.get('runner_up')})" for r in lows)
                                         .most_common(10)),
            "keys": dict(Counter(r.get("key") or "-" for r in records))}


def format_summary(s: dict) -> str:
    lines = [f"{s['requests']} requests ({s['auto']} to auto); status: "
             + ", ".join(f"{k} {v}" for k, v in sorted(s["status"].items())),
             f"{'served by':<16}{'requests':>9}{'share':>8}{'confidence':>12}"]
    for d, v in s["served"].items():
        c = f"{v['mean_confidence']:.3f}" if v["mean_confidence"] is not None else "-"
        lines.append(f"{d:<16}{v['requests']:>9}{100 * v['share']:>7.1f}%{c:>12}")
    if s["abstained"]:
        lines.append("auto sent to base: " + ", ".join(f"{why} {n}" for why, n in s["abstained"].items()))
    lines.append(f"low confidence (< {s['low_confidence_threshold']:g}): {s['low_confidence']} auto requests"
                 + ("; most often " + ", ".join(f"{k} x{n}" for k, n in s["low_confidence_pairs"].items())
                    if s["low_confidence_pairs"] else ""))
    if s["low_confidence"]:
        lines.append("  give the domains they should have gone to example queries: crma add --route-examples FILE")
    return "\n".join(lines)
