"""The router: which domain adapter serves a query, from per-domain feature statistics only.

Features in (crma.routing.features: the base model's mean-pooled hidden state plus the query's characters per
token), decisions out. The state is per-domain statistics, never text: count n_d, feature mean mu_d,
feature covariance C_d, k prototypes (strategy `kproto`) and two abstain thresholds. Each is computed
from domain d's own data; pooled quantities are recomputed from them, so adding domains one at a time
gives the same state as building from all of them at once, in any order.

Strategies pick the domain (scores: larger = closer):
    lda       -1/2 (x - mu_d)^T Sw^-1 (x - mu_d) / dim    Sw = shrunk pooled within-domain covariance
    diag      -1/2 sum_k (x_k - mu_dk)^2 / v_dk / dim      v_d = diag(C_d) + 0.1 mean(diag C_d)
    centroid  20 cos(x - m, mu_d - m)                        m = count-weighted mean of all mu_d
    kproto    20 max_j cos(x - m, p_dj - m)                  p_dj: k-means centres of domain d

Abstention (route to `base`) for the chosen domain d:
    ood_d(x) = (x - mu_d)^T S_d^-1 (x - mu_d) / dim,   S_d = (1 - s) C_d + s tr(C_d)/dim I
    abstain if ood_d(x) > slack * quantile_q(ood_d(held-out features of d))
            or chars_per_token(x) < 0.9 * quantile_0.01(chars_per_token(held-out texts of d))
The first test catches text unlike the domain; the second catches character noise (the tokenizer
splits random characters into ~1.2 characters per token, real text of every cl5 domain is above 2.3).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_dir

STRATEGIES = ("lda", "diag", "centroid", "kproto")
BASE = "base"                     # the decision "no domain adapter"
ROUTER_DIR = "router"
FORMAT = "crma-router-v1"
_COS_SCALE = 20.0                 # cosine scores to logits for the confidence softmax
_CPT_QUANTILE, _CPT_SLACK = 0.01, 0.9


class RouterError(ValueError):
    """A router setting or state that cannot work."""


@dataclass
class RouterConfig:
    """How the router is built and decides. Defaults chosen by measurement (benchmarks/route_measure.py)."""

    strategy: str = "lda"           # lda | diag | centroid | kproto
    layer: int = 6                  # hidden state after block `layer` (0 = embeddings, -1 = last; capped at depth)
                                    # SmolLM2: 6 of 30 blocks, ~19 ms a query on 2 cores (layer 8: ~24 ms)
    max_tokens: int = 64            # queries (and passage segments) are truncated to this many tokens
    min_words: int = 6              # passages are cut into sentence/line segments of at least this many words
    segments_per_passage: int = 8   # at most this many segments from each passage
    max_passages: int = 200         # train passages per domain used to build (0 = all)
    max_calib: int = 100            # held-out passages per domain used to calibrate (0 = all)
    quantile: float = 0.99          # abstain threshold = slack * this quantile of in-domain held-out distances
    slack: float = 1.1              # SmolLM2/cl5 queries: slack 1.0 -> 98.0% accuracy, 83% OOD to base;
                                    # 1.1 -> 99.2%, 79%; 1.25 -> 99.4%, 71% (mean over OOD sources)
    shrinkage: float = 0.1          # lda: Sw = (1 - s) W + s tr(W)/dim I
    ood_shrinkage: float = 0.01     # s of the per-domain covariance S_d used for abstaining
    prototypes: int = 4             # kproto: prototypes per domain
    temperature: float = 1.0        # confidence = softmax(score / temperature)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                from ..config import ConfigError
                raise ConfigError(f"router.{name}: {msg}")
        check(self.strategy in STRATEGIES, "strategy", f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        check(self.max_tokens >= 2, "max_tokens", f"must be >= 2, got {self.max_tokens}")
        check(self.min_words >= 1, "min_words", f"must be >= 1, got {self.min_words}")
        check(self.segments_per_passage >= 1, "segments_per_passage", "must be >= 1")
        check(self.max_passages >= 0 and self.max_calib >= 0, "max_passages", "must be >= 0")
        check(0 < self.quantile <= 1, "quantile", f"must be in (0, 1], got {self.quantile}")
        check(self.slack > 0, "slack", f"must be > 0, got {self.slack}")
        for name in ("shrinkage", "ood_shrinkage"):
            check(0 <= getattr(self, name) <= 1, name, f"must be in [0, 1], got {getattr(self, name)}")
        check(self.prototypes >= 1, "prototypes", f"must be >= 1, got {self.prototypes}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")


class Features(NamedTuple):
    pooled: torch.Tensor                         # (n, dim) mean-pooled hidden states
    chars_per_token: torch.Tensor | None = None  # (n,) characters per token of each text (None: no gate)


class Decision(NamedTuple):
    domain: str                   # a domain name, or "base" when abstaining
    confidence: float             # softmax probability of the best-scoring domain
    runner_up: str | None         # second-best domain (None with a single domain)
    runner_up_confidence: float
    best: str                     # best-scoring domain, even when abstaining
    ood_ratio: float              # ood_d(x) / threshold of `best` (> 1: abstain)
    reason: str = ""              # why it abstained: "distance" or "characters"


def _as_features(f) -> Features:
    f = f if isinstance(f, Features) else Features(f)
    x = f.pooled.detach().double().cpu()
    x = x.unsqueeze(0) if x.ndim == 1 else x                                       # (n, dim)
    cpt = None if f.chars_per_token is None else f.chars_per_token.detach().double().cpu().reshape(-1)
    return Features(x, cpt)


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


def shrunk_precision(cov: torch.Tensor, s: float) -> torch.Tensor:
    """((1 - s) C + s tr(C)/dim I)^-1 for a (dim, dim) covariance, in float64."""
    dim = cov.shape[0]
    eye = torch.eye(dim, dtype=torch.float64)
    target = float(torch.trace(cov)) / dim
    sigma = (1 - s) * cov.double() + s * max(target, 1e-12) * eye
    return torch.linalg.inv(sigma + 1e-9 * max(target, 1e-12) * eye)


def _quad(x: torch.Tensor, mu: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """(x - mu)^T P (x - mu) / dim for rows of x (n, dim) -> (n,)."""
    z = x - mu                                                                     # (n, dim)
    return ((z @ prec) * z).sum(-1) / x.shape[1]


class Router:
    """Per-domain statistics and the routing decision. Build with add_domain, one domain at a time."""

    def __init__(self, cfg: RouterConfig | None = None, dim: int | None = None, meta: dict | None = None):
        self.cfg = cfg or RouterConfig()
        self.dim = dim
        self.meta = dict(meta or {})          # model fingerprint, resolved layer, ...
        self.names: list[str] = []
        self.adapters: dict[str, str] = {}    # domain -> adapter name (naive runs: all "shared")
        self.calibration: dict[str, dict] = {}
        self.t: dict[str, torch.Tensor] = {}  # stacked per-domain statistics, float32
        self._cache: dict = {}

    # ---- building ---------------------------------------------------------------------------
    def add_domain(self, name: str, features, calib=None, adapter: str | None = None) -> "Router":
        """Add domain `name` from its own features (Features or an (n, dim) tensor) and calibrate
        its thresholds on `calib`, its held-out features (the training features when None)."""
        if name == BASE or not name:
            raise RouterError(f"domain name {name!r} is reserved")
        if name in self.names:
            raise RouterError(f"domain {name!r} is already in the router (merge_domain adds data to it)")
        f = _as_features(features)
        x = f.pooled                                                               # (n, dim)
        if x.ndim != 2 or x.shape[0] < 2:
            raise RouterError(f"domain {name!r}: need features of shape (n >= 2, dim), got {tuple(x.shape)}")
        if self.dim is None:
            self.dim = x.shape[1]
        if x.shape[1] != self.dim:
            raise RouterError(f"domain {name!r}: feature size {x.shape[1]}, router expects {self.dim}")
        mu = x.mean(0)                                                             # (dim,)
        cov = (x - mu).T @ (x - mu) / (x.shape[0] - 1)                             # (dim, dim)
        row = {"count": torch.tensor([float(x.shape[0])]), "mean": mu[None].float(), "cov": cov[None].float()}
        if self.cfg.strategy == "kproto":
            p = kmeans(x, self.cfg.prototypes)                                     # (<=k, dim)
            pad = p[-1:].expand(self.cfg.prototypes - p.shape[0], -1)              # repeat the last centre
            row["protos"] = torch.cat([p, pad])[None].float()                      # (1, k, dim)
        held = f if calib is None else _as_features(calib)
        prec = shrunk_precision(row["cov"][0], self.cfg.ood_shrinkage)
        dist = _quad(held.pooled, row["mean"][0].double(), prec)                   # (m,)
        q = float(torch.quantile(dist, self.cfg.quantile))
        row["threshold"] = torch.tensor([q * self.cfg.slack])
        cpt = held.chars_per_token
        row["cpt_min"] = torch.tensor([0.0 if cpt is None else _CPT_SLACK * float(torch.quantile(cpt, _CPT_QUANTILE))])
        for key, value in row.items():
            self.t[key] = value.float() if key not in self.t else torch.cat([self.t[key], value.float()])
        self.names.append(name)
        self.adapters[name] = adapter or name
        self.calibration[name] = {"n_train": int(x.shape[0]), "n_calib": int(held.pooled.shape[0]),
                                  "calibrated_on": "train" if calib is None else "holdout",
                                  "quantile_distance": q, "threshold": float(row["threshold"][0]),
                                  "min_chars_per_token": float(row["cpt_min"][0])}
        self._cache = {}
        return self

    def _row(self, name: str) -> dict[str, torch.Tensor]:
        i = self.names.index(name)
        return {k: v[i : i + 1].clone() for k, v in self.t.items()}

    def _set_row(self, name: str, row: dict[str, torch.Tensor], calibration: dict, adapter: str) -> None:
        if name in self.names:
            i = self.names.index(name)
            for k, v in row.items():
                self.t[k][i : i + 1] = v.float()
        else:
            for k, v in row.items():
                self.t[k] = v.float() if k not in self.t else torch.cat([self.t[k], v.float()])
            self.names.append(name)
        self.adapters[name] = adapter
        self.calibration[name] = calibration
        self._cache = {}

    def merge_domain(self, name: str, features, calib=None) -> "Router":
        """Add new data to domain `name` (add it when new): pooled statistics of old and new data,
        exactly as if both had been given at once, with no old text or features needed:

            n = n1 + n2,   mu = (n1 mu1 + n2 mu2) / n,
            C = ((n1 - 1) C1 + (n2 - 1) C2 + n1 n2 / n (mu1 - mu2)(mu1 - mu2)^T) / (n - 1)

        The abstain threshold is recalibrated on the new held-out features under the merged
        statistics and averaged with the old one, weighted by their calibration counts."""
        if name not in self.names:
            return self.add_domain(name, features, calib)
        old, old_cal, adapter = self._row(name), self.calibration[name], self.adapters[name]
        tmp = Router(self.cfg, self.dim, self.meta).add_domain(name, features, calib, adapter)
        new, new_cal = tmp._row(name), tmp.calibration[name]
        n1, n2 = float(old["count"][0]), float(new["count"][0])
        mu1, mu2 = old["mean"][0].double(), new["mean"][0].double()
        n = n1 + n2
        mu = (n1 * mu1 + n2 * mu2) / n
        diff = (mu1 - mu2)[:, None]
        cov = ((n1 - 1) * old["cov"][0].double() + (n2 - 1) * new["cov"][0].double()
               + n1 * n2 / n * diff @ diff.T) / (n - 1)
        row = {"count": torch.tensor([n]), "mean": mu[None], "cov": cov[None]}
        if "protos" in old:     # k-means over the old centres and the new ones
            p = kmeans(torch.cat([old["protos"][0], new["protos"][0]]).double(), self.cfg.prototypes)
            row["protos"] = torch.cat([p, p[-1:].expand(self.cfg.prototypes - p.shape[0], -1)])[None]
        held = _as_features(features if calib is None else calib)
        dist = _quad(held.pooled, mu, shrunk_precision(cov, self.cfg.ood_shrinkage))
        q_new = float(torch.quantile(dist, self.cfg.quantile))
        c1, c2 = old_cal["n_calib"], new_cal["n_calib"]
        row["threshold"] = torch.tensor([(c1 * float(old["threshold"][0]) + c2 * q_new * self.cfg.slack) / (c1 + c2)])
        row["cpt_min"] = torch.minimum(old["cpt_min"], new["cpt_min"])
        cal = {"n_train": old_cal["n_train"] + new_cal["n_train"], "n_calib": c1 + c2,
               "calibrated_on": new_cal["calibrated_on"], "quantile_distance": q_new,
               "threshold": float(row["threshold"][0]), "min_chars_per_token": float(row["cpt_min"][0]),
               "merged": old_cal.get("merged", 1) + 1}
        self._set_row(name, row, cal, adapter)
        return self

    def remove_domain(self, name: str) -> "Router":
        """Drop domain `name` and its statistics."""
        if name not in self.names:
            raise RouterError(f"domain {name!r} is not in the router; have {self.names}")
        i = self.names.index(name)
        keep = [j for j in range(len(self.names)) if j != i]
        self.t = {k: v[keep] for k, v in self.t.items()} if keep else {}
        self.names.pop(i)
        self.adapters.pop(name)
        self.calibration.pop(name)
        self._cache = {}
        return self

    def take_domain(self, other: "Router", name: str) -> "Router":
        """Replace (or add) domain `name` with its state in `other` (rollback to an earlier version)."""
        if name not in other.names:
            raise RouterError(f"domain {name!r} is not in the router to take it from")
        if other.dim != self.dim and self.names:
            raise RouterError(f"feature size {other.dim} != {self.dim}")
        self.dim = other.dim
        self._set_row(name, other._row(name), dict(other.calibration[name]), other.adapters[name])
        return self

    # ---- deciding ---------------------------------------------------------------------------
    def _stats(self) -> dict:
        """Float64 views and precision matrices derived from the state (cached until the next add)."""
        if not self._cache:
            counts = self.t["count"].double()                                      # (D,)
            means = self.t["mean"].double()                                        # (D, dim)
            covs = self.t["cov"].double()                                          # (D, dim, dim)
            c = {"counts": counts, "means": means,
                 "ood_prec": [shrunk_precision(cv, self.cfg.ood_shrinkage) for cv in covs]}
            if self.cfg.strategy == "lda":
                within = ((counts - 1)[:, None, None] * covs).sum(0) / max(1.0, float(counts.sum()) - len(counts))
                c["lda_prec"] = shrunk_precision(within, self.cfg.shrinkage)      # (dim, dim)
            if self.cfg.strategy == "diag":
                var = torch.diagonal(covs, dim1=1, dim2=2)                         # (D, dim)
                c["var"] = var + 0.1 * var.mean(-1, keepdim=True)
            c["center"] = (counts[:, None] * means).sum(0) / counts.sum()          # (dim,)
            self._cache = c
        return self._cache

    def scores(self, features) -> torch.Tensor:
        """Score of every domain for each feature row: (n, dim) -> (n, D); larger is closer."""
        if not self.names:
            raise RouterError("the router has no domains yet")
        x = _as_features(features).pooled                                          # (n, dim)
        if x.shape[1] != self.dim:
            raise RouterError(f"features have size {x.shape[1]}, router expects {self.dim}")
        c = self._stats()
        means = c["means"]
        if self.cfg.strategy == "lda":
            return -0.5 * torch.stack([_quad(x, mu, c["lda_prec"]) for mu in means], 1)      # (n, D)
        if self.cfg.strategy == "diag":
            return -0.5 * ((x[:, None] - means[None]) ** 2 / c["var"][None]).mean(-1)       # (n, D)
        z = torch.nn.functional.normalize(x - c["center"], dim=-1)                 # (n, dim)
        if self.cfg.strategy == "centroid":
            cen = torch.nn.functional.normalize(means - c["center"], dim=-1)        # (D, dim)
            return _COS_SCALE * z @ cen.T                                          # (n, D)
        p = torch.nn.functional.normalize(self.t["protos"].double() - c["center"], dim=-1)  # (D, k, dim)
        return _COS_SCALE * torch.einsum("nd,akd->nak", z, p).max(-1).values      # (n, D)

    def route_batch(self, features) -> list[Decision]:
        """One Decision per feature row."""
        f = _as_features(features)
        s = self.scores(f)                                                         # (n, D)
        prob = torch.softmax(s / self.cfg.temperature, dim=-1)                     # (n, D)
        order = s.argsort(-1, descending=True)                                     # (n, D)
        c = self._stats()
        out = []
        for row in range(s.shape[0]):
            i = int(order[row, 0])
            j = int(order[row, 1]) if len(self.names) > 1 else None
            dist = float(_quad(f.pooled[row : row + 1], c["means"][i], c["ood_prec"][i])[0])
            ratio = dist / max(float(self.t["threshold"][i]), 1e-12)
            reason = "distance" if ratio > 1 else ""
            if f.chars_per_token is not None and float(f.chars_per_token[row]) < float(self.t["cpt_min"][i]):
                reason = reason or "characters"
            out.append(Decision(domain=BASE if reason else self.names[i], confidence=float(prob[row, i]),
                                runner_up=None if j is None else self.names[j],
                                runner_up_confidence=0.0 if j is None else float(prob[row, j]),
                                best=self.names[i], ood_ratio=ratio, reason=reason))
        return out

    def route(self, features) -> Decision:
        """The decision for one feature vector (dim,) or a one-row Features."""
        return self.route_batch(features)[0]

    def adapter_for(self, domain: str) -> str | None:
        """Adapter name serving `domain`, None for base."""
        return None if domain == BASE else self.adapters[domain]

    # ---- persistence ------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write DIR/router/{router.safetensors, router.json} together (atomically, as one folder)."""
        target = Path(directory) / ROUTER_DIR
        with atomic_dir(target) as tmp:
            self.save_to(tmp)
        return target

    def save_to(self, folder: str | Path) -> list[Path]:
        """Write router.safetensors and router.json into `folder` itself (the caller makes it atomic)."""
        folder = Path(folder)
        info = {"format": FORMAT, "config": asdict(self.cfg), "dim": self.dim, "domains": self.names,
                "adapters": self.adapters, "calibration": self.calibration, "meta": self.meta}
        save_file({k: v.contiguous() for k, v in self.t.items()}, str(folder / "router.safetensors"),
                  metadata={"format": FORMAT})
        (folder / "router.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        return [folder / "router.safetensors", folder / "router.json"]

    @classmethod
    def load(cls, directory: str | Path) -> "Router":
        """Load DIR/router (or the router folder itself); fails naming the path when missing."""
        path = Path(directory)
        path = path if (path / "router.json").exists() else path / ROUTER_DIR
        if not (path / "router.json").exists() or not (path / "router.safetensors").exists():
            raise FileNotFoundError(f"{path}: no router here (router.json + router.safetensors); "
                                    f"`crma run` writes one as each domain's phase ends")
        info = json.loads((path / "router.json").read_text(encoding="utf-8"))
        if info.get("format") != FORMAT:
            raise RouterError(f"{path / 'router.json'}: not a crma router (format={info.get('format')!r})")
        router = cls(RouterConfig(**info["config"]), info["dim"], info.get("meta"))
        router.names = list(info["domains"])
        router.adapters = dict(info["adapters"])
        router.calibration = dict(info["calibration"])
        router.t = load_file(str(path / "router.safetensors"))
        if len(router.t.get("count", [])) != len(router.names):
            raise RouterError(f"{path}: router.json names {len(router.names)} domains, "
                              f"router.safetensors holds {len(router.t.get('count', []))}")
        return router


def quantile_summary(values: list[float]) -> dict:
    """p50 / p95 / mean of a list (for latencies)."""
    if not values:
        return {"p50": math.nan, "p95": math.nan, "mean": math.nan, "n": 0}
    t = torch.tensor(values, dtype=torch.float64)
    return {"p50": float(torch.quantile(t, 0.5)), "p95": float(torch.quantile(t, 0.95)),
            "mean": float(t.mean()), "n": len(values)}
