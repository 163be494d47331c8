"""What the server tells its operator: Prometheus metrics (`GET /metrics`) and the routing log.

Metrics (prometheus-client, one registry per server):

    crma_requests_total{model, domain, status}         finished requests: model asked, domain served (or "-"
                                                       when refused before routing), status (HTTP code, or
                                                       "cancelled" for a client that went away)
    crma_router_decisions_total{domain, reason}        `auto` requests: the domain chosen ("base" when the
                                                       router abstained, reason characters|background|distance)
    crma_queue_depth, crma_running_rows                requests waiting for a slot, rows decoding (gauges)
    crma_prompt_tokens_total, crma_generated_tokens_total
    crma_time_to_first_token_seconds                   arrival to the first generated token (histogram)
    crma_time_per_output_token_seconds                 after the first token, per further token (histogram)
    crma_reloads_total{result}                         ok | refused
    crma_manifest_updated_timestamp_seconds            the served manifest's update time

Routing log (`--route-log FILE`): one JSON line per finished request: time, key id, model asked, domain
served, router confidence and runner-up, adapter and backbone versions, tokens in and out, time to first
token, total time, status; rotated by size (`--route-log-bytes`, `--route-log-backups`). No prompt or
answer text unless `--log-text`. `crma route-log FILE` summarises it.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Telemetry:
    """The server's counters and its routing log; every method is safe to call from any thread."""

    def __init__(self, route_log: Path | None = None, log_bytes: int = 10 << 20, backups: int = 5,
                 log_text: bool = False):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("crma_requests", "Finished requests", ["model", "domain", "status"], registry=r)
        self.decisions = Counter("crma_router_decisions", "Router decisions for `auto`", ["domain", "reason"],
                                 registry=r)
        self.queue = Gauge("crma_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("crma_running_rows", "Rows being decoded", registry=r)
        self.prompt_tokens = Counter("crma_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("crma_generated_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("crma_time_to_first_token_seconds", "Arrival to the first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("crma_time_per_output_token_seconds", "Time per generated token after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.reloads = Counter("crma_reloads", "Store reloads", ["result"], registry=r)
        self.manifest = Gauge("crma_manifest_updated_timestamp_seconds", "Update time of the served manifest",
                              registry=r)
        self.log_text = log_text
        self.log = None
        if route_log is not None:
            Path(route_log).parent.mkdir(parents=True, exist_ok=True)
            self.log = logging.getLogger(f"crma.route_log.{id(self)}")
            self.log.propagate = False
            self.log.setLevel(logging.INFO)
            handler = logging.handlers.RotatingFileHandler(route_log, maxBytes=log_bytes, backupCount=backups,
                                                           encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(message)s"))
            self.log.addHandler(handler)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict:
        """The counters above as one dictionary (what the console's live view polls): totals, requests
        per domain and per status, the gauges, and time to first token (count, mean, p50 and p90 estimated
        from the histogram's buckets as Prometheus' histogram_quantile does)."""
        samples = {}
        for metric in self.registry.collect():
            for s in metric.samples:
                samples.setdefault(s.name, []).append(s)

        def total(name: str) -> float:
            return sum(s.value for s in samples.get(name, []))

        def by(name: str, label: str) -> dict[str, float]:
            return _sum_by(samples.get(name, []), label)

        buckets = sorted(((float(s.labels["le"]), s.value) for s in samples.get(
            "crma_time_to_first_token_seconds_bucket", [])), key=lambda b: b[0])
        count = total("crma_time_to_first_token_seconds_count")
        mean = total("crma_time_to_first_token_seconds_sum") / count if count else None
        return {"requests": total("crma_requests_total"), "by_domain": by("crma_requests_total", "domain"),
                "by_status": by("crma_requests_total", "status"), "by_model": by("crma_requests_total", "model"),
                "router": by("crma_router_decisions_total", "domain"),
                "prompt_tokens": total("crma_prompt_tokens_total"),
                "generated_tokens": total("crma_generated_tokens_total"),
                "queue_depth": total("crma_queue_depth"), "running_rows": total("crma_running_rows"),
                "reloads": by("crma_reloads_total", "result"),
                "ttft": {"count": count, "mean": mean,
                         "p50": bucket_quantile(buckets, 0.5), "p90": bucket_quantile(buckets, 0.9)}}

    def manifest_served(self, updated: str | None) -> None:
        if updated:
            try:
                self.manifest.set(datetime.fromisoformat(updated.replace("Z", "+00:00")).timestamp())
            except ValueError:
                pass

    def refused(self, model: str, status: int) -> None:
        """A request refused before it reached the scheduler (auth, validation, a full queue)."""
        self.requests.labels(model=model or "-", domain="-", status=str(status)).inc()

    def decided(self, domain: str, reason: str) -> None:
        self.decisions.labels(domain=domain, reason=reason or "chosen").inc()

    def finished(self, record: dict, prompt: str | None = None, answer: str | None = None) -> None:
        """One request's end (the scheduler's record: see the module docstring)."""
        self.requests.labels(model=record["model"], domain=record["domain"] or "-", status=record["status"]).inc()
        self.prompt_tokens.inc(record["prompt_tokens"])
        self.generated_tokens.inc(record["completion_tokens"])
        if record["ttft_s"] is not None:
            self.ttft.observe(record["ttft_s"])
            if record["completion_tokens"] > 1:
                self.tpot.observe((record["total_s"] - record["ttft_s"]) / (record["completion_tokens"] - 1))
        if self.log is not None:
            line = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **record}
            if self.log_text:
                line.update(prompt=prompt, answer=answer)
            self.log.info(json.dumps(line, ensure_ascii=False))

    def close(self) -> None:
        if self.log is not None:
            for h in list(self.log.handlers):
                h.close()
                self.log.removeHandler(h)



def _sum_by(samples, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in samples:
        out[s.labels.get(label, "-")] = out.get(s.labels.get(label, "-"), 0.0) + s.value
    return out


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of a histogram from its cumulative buckets [(upper bound, count <= bound), ...]:
    linear interpolation inside the bucket the rank r = q * total falls in,
    x = lo + (hi - lo) * (r - c_lo) / (c_hi - c_lo), as Prometheus' histogram_quantile; the last finite
    bound when r falls in the +Inf bucket; None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lo, c_lo = 0.0, 0.0
    for hi, c_hi in buckets:
        if c_hi >= rank:
            if hi == float("inf"):
                return lo
            return lo + (hi - lo) * ((rank - c_lo) / (c_hi - c_lo) if c_hi > c_lo else 0.0)
        lo, c_lo = hi, c_hi
    return lo
