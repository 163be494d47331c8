"""The router: which domain adapter serves a query, or none (`base`), from statistics only.

Features in (crma.routing.encoders: by default the all-MiniLM-L6-v2 sentence embedding of the query,
plus its characters per token), decisions out. The state is statistics, never text:

  per domain d   count n_d, mean mu_d, covariance C_d of its own train passages (cut into sentence-sized
                 segments); an abstain threshold t_d and a claim level c_d, calibrated on a held-back
                 slice of its train passages (never on holdout documents, where evaluation queries come from)
  background     embeddings of generic conversational text that is none of the store's domains
                 (crma/routing/background.py: chatterbot-corpus, BSD-3-Clause), shipped as embeddings
  noise gate     the smallest characters per token of real text, set from the encoder's tokenizer alone

Each domain row is computed from that domain's data only, and every pooled quantity is derived from the
rows and the background when deciding, so adding domains one at a time gives the same state as adding them
all at once, in any order.

Deciding, for a query with features x (the first `abstain_dims` of them, the encoder's sentence embedding,
are what the background and distance tests read; the domain choice reads all of them):
  1. characters  cpt(x) < noise_min                                          -> base, reason "characters"
  2. background  lda over the domains plus the background's k-means components (background items a
                 domain claims, ood_d(b) <= c_d, are left out of the class: on cl5 that is 1 of 2006);
                 a background component scores highest                      -> base, reason "background"
  3. distance    ood_d(x) = (x - mu_d)^T S_d^-1 (x - mu_d) / dim > t_d for the best domain d
                                                                            -> base, reason "distance"
  4. otherwise the best domain by the strategy's scores (larger = closer), over the domains only:
                   lda       -1/2 (x - mu_d)^T Sw^-1 (x - mu_d) / dim    Sw = shrunk pooled within-domain covariance
                   diag      -1/2 sum_k (x_k - mu_dk)^2 / v_dk / dim      v_d = diag(C_d) + 0.1 mean(diag C_d)
                   centroid  20 cos(x - m, mu_d - m)                        m = count-weighted mean of the means
                   kproto    20 max_j cos(x - m, p_dj - m)                  p_dj: k-means centres of domain d
Shrinkage: S = (1 - r) C + r tr(C)/dim I, with r = max(configured floor, the OAS estimate from C and n),
so a domain built from a few dozen passages (fewer segments than dimensions) still has a usable metric.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_dir
from .settings import RouterConfig, RouterError
from .stats import kmeans, lda_scores, moments, oas_shrinkage, quad_form, quantile, shrunk_precision

BASE = "base"                     # the decision "no domain adapter"
ROUTER_DIR = "router"
FORMAT = "crma-router-v2"
REASONS = ("characters", "background", "distance", "empty")
_COS_SCALE = 20.0                 # cosine scores to logits for the confidence softmax


class Features(NamedTuple):
    pooled: torch.Tensor                         # (n, dim) pooled embeddings
    chars_per_token: torch.Tensor | None = None  # (n,) characters per token of each text (None: no gate)


class Decision(NamedTuple):
    domain: str                   # a domain name, or "base" when abstaining
    confidence: float             # softmax probability of the best-scoring domain (background a class too)
    runner_up: str | None         # second-best domain (None with a single domain)
    runner_up_confidence: float
    best: str | None              # best-scoring domain, even when abstaining (None: no domain scored)
    ood_ratio: float              # ood_d(x) / t_d of `best` (> 1: abstain for distance)
    reason: str = ""              # why it abstained: "characters", "background", "distance" or "empty"
    background_confidence: float = 0.0   # softmax probability of the background class


def _as_features(f) -> Features:
    f = f if isinstance(f, Features) else Features(f)
    x = f.pooled.detach().double().cpu()
    x = x.unsqueeze(0) if x.ndim == 1 else x                                       # (n, dim)
    cpt = None if f.chars_per_token is None else f.chars_per_token.detach().double().cpu().reshape(-1)
    return Features(x, cpt)


class Router:
    """Per-domain statistics, the background class, the noise gate and the routing decision.

    Build with add_domain (or crma.routing.update_router, which also computes the features)."""

    def __init__(self, cfg: RouterConfig | None = None, dim: int | None = None, meta: dict | None = None):
        self.cfg = cfg or RouterConfig()
        self.dim = dim
        self.meta = dict(meta or {})          # encoder spec, background and noise-gate provenance, model, ...
        self.names: list[str] = []
        self.adapters: dict[str, str] = {}    # domain -> adapter name (naive runs: all "shared")
        self.calibration: dict[str, dict] = {}
        self.t: dict[str, torch.Tensor] = {}  # stacked per-domain statistics, float32
        self.background: torch.Tensor | None = None   # (N, dim) embeddings of out-of-scope text
        self.noise_min: float = 0.0           # characters per token below this: noise (0 = gate off)
        self.abstain_dims: int | None = None  # leading feature dims of the background/distance tests (None: all)
        self._cache: dict = {}

    # ---- background and noise gate ------------------------------------------------------------
    def set_background(self, embeddings: torch.Tensor | None, info: dict | None = None) -> Router:
        """The out-of-scope class: (N, dim) embeddings of text that is none of the domains."""
        if embeddings is not None:
            embeddings = embeddings.detach().float().cpu()
            if embeddings.ndim != 2 or embeddings.shape[0] < 2:
                raise RouterError(f"background: need (N >= 2, dim) embeddings, got {tuple(embeddings.shape)}")
            width = self.abstain_dims or self.dim
            if width is None:
                self.dim = width = embeddings.shape[1]
            if embeddings.shape[1] != width:
                raise RouterError(f"background: feature size {embeddings.shape[1]}, router expects {width}")
        self.background = embeddings
        self.meta["background"] = dict(info or {}) if embeddings is not None else None
        self._cache = {}
        return self

    def set_noise_gate(self, min_chars_per_token: float, info: dict | None = None) -> Router:
        self.noise_min = float(min_chars_per_token)
        self.meta["noise"] = {"min_chars_per_token": self.noise_min, **(info or {})}
        return self

    # ---- building ---------------------------------------------------------------------------
    def _domain_row(self, name: str, features, calib) -> tuple[dict, dict]:
        f = _as_features(features)
        x = f.pooled                                                               # (n, dim)
        if x.ndim != 2 or x.shape[0] < 2:
            raise RouterError(f"domain {name!r}: need features of shape (n >= 2, dim), got {tuple(x.shape)}")
        if self.dim is None:
            self.dim = x.shape[1]
        if x.shape[1] != self.dim:
            raise RouterError(f"domain {name!r}: feature size {x.shape[1]}, router expects {self.dim}")
        n, mu, cov = moments(x)
        row = {"count": torch.tensor([n]), "mean": mu[None], "cov": cov[None]}
        if self.cfg.strategy == "kproto":
            p = kmeans(x, self.cfg.prototypes)                                     # (<=k, dim)
            pad = p[-1:].expand(self.cfg.prototypes - p.shape[0], -1)              # repeat the last centre
            row["protos"] = torch.cat([p, pad])[None]                              # (1, k, dim)
        held = f if calib is None else _as_features(calib)
        if held.pooled.shape[1] != self.dim:
            raise RouterError(f"domain {name!r}: calibration feature size {held.pooled.shape[1]} != {self.dim}")
        a = self._block()
        dist = quad_form(held.pooled[:, :a], mu[:a], self._ood_precision(cov[:a, :a], n))   # (m,)
        q, c = quantile(dist, self.cfg.quantile), quantile(dist, self.cfg.claim_quantile)
        row["threshold"] = torch.tensor([q * self.cfg.slack])
        row["claim"] = torch.tensor([c])
        cal = {"n_train": int(n), "n_calib": int(held.pooled.shape[0]),
               "calibrated_on": "train" if calib is None else "held-back train",
               "quantile_distance": q, "threshold": q * self.cfg.slack, "claim_distance": c}
        return row, cal

    def add_domain(self, name: str, features, calib=None, adapter: str | None = None) -> Router:
        """Add domain `name` from its own features (Features or an (n, dim) tensor) and calibrate its
        thresholds on `calib`: features of held-back passages of its own (the training features when None)."""
        if name == BASE or not name:
            raise RouterError(f"domain name {name!r} is reserved")
        if name in self.names:
            raise RouterError(f"domain {name!r} is already in the router (merge_domain adds data to it)")
        row, cal = self._domain_row(name, features, calib)
        self._set_row(name, row, cal, adapter or name)
        return self

    def _ood_precision(self, cov: torch.Tensor, n: float) -> torch.Tensor:
        return shrunk_precision(cov, max(self.cfg.ood_shrinkage, oas_shrinkage(cov.double(), n)))

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

    def merge_domain(self, name: str, features, calib=None) -> Router:
        """Add new data to domain `name` (add it when new): pooled statistics of old and new data,
        exactly as if both had been given at once, with no old text or features needed:

            n = n1 + n2,   mu = (n1 mu1 + n2 mu2) / n,
            C = ((n1 - 1) C1 + (n2 - 1) C2 + n1 n2 / n (mu1 - mu2)(mu1 - mu2)^T) / (n - 1)

        The thresholds are recalibrated on the new held-back features under the merged statistics and
        averaged with the old ones, weighted by their calibration counts."""
        if name not in self.names:
            return self.add_domain(name, features, calib)
        old, old_cal, adapter = self._row(name), self.calibration[name], self.adapters[name]
        new, new_cal = self._domain_row(name, features, calib)
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
        a = self._block()
        dist = quad_form(held.pooled[:, :a], mu[:a], self._ood_precision(cov[:a, :a], n))
        q_new, c_new = quantile(dist, self.cfg.quantile), quantile(dist, self.cfg.claim_quantile)
        w1, w2 = old_cal["n_calib"], new_cal["n_calib"]
        row["threshold"] = torch.tensor([(w1 * float(old["threshold"][0]) + w2 * q_new * self.cfg.slack) / (w1 + w2)])
        row["claim"] = torch.tensor([(w1 * float(old["claim"][0]) + w2 * c_new) / (w1 + w2)])
        cal = {"n_train": old_cal["n_train"] + new_cal["n_train"], "n_calib": w1 + w2,
               "calibrated_on": new_cal["calibrated_on"], "quantile_distance": q_new,
               "threshold": float(row["threshold"][0]), "claim_distance": float(row["claim"][0]),
               "merged": old_cal.get("merged", 1) + 1}
        self._set_row(name, row, cal, adapter)
        return self

    def remove_domain(self, name: str) -> Router:
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

    def take_domain(self, other: Router, name: str) -> Router:
        """Replace (or add) domain `name` with its state in `other` (rollback to an earlier version)."""
        if name not in other.names:
            raise RouterError(f"domain {name!r} is not in the router to take it from")
        if other.dim != self.dim and self.names:
            raise RouterError(f"feature size {other.dim} != {self.dim}")
        mine, theirs = self.meta.get("encoder"), other.meta.get("encoder")
        if mine is not None and theirs is not None and mine != theirs:
            raise RouterError(f"domain {name!r} was built with other features ({theirs.get('name')}) "
                              f"than this router's ({mine.get('name')})")
        if other.abstain_dims != self.abstain_dims and self.names:
            raise RouterError(f"domain {name!r}: abstain dims {other.abstain_dims} != {self.abstain_dims}")
        if set(other.t) != set(self.t) and self.names:
            raise RouterError(f"domain {name!r}: statistics {sorted(other.t)} do not match {sorted(self.t)}")
        self.dim = other.dim
        self._set_row(name, other._row(name), dict(other.calibration[name]), other.adapters[name])
        return self

    # ---- deciding ---------------------------------------------------------------------------
    def _block(self) -> int:
        """Leading feature dims the background and distance tests read (the sentence embedding)."""
        return self.abstain_dims or self.dim

    def _background_classes(self, means: torch.Tensor, ood_prec: list, claims: torch.Tensor) -> list:
        """(n, mean, cov) of each k-means component of the background items no domain claims."""
        if self.background is None or self.cfg.background == "none":
            return []
        b = self.background.double()                                               # (N, a)
        keep = torch.ones(len(b), dtype=torch.bool)
        for mu, prec, claim in zip(means, ood_prec, claims, strict=False):
            keep &= quad_form(b, mu, prec) > float(claim)
        b = b[keep]
        self._cache["background_kept"] = int(keep.sum())
        if len(b) < 2:
            return []
        centres = kmeans(b, self.cfg.background_components)
        assign = torch.cdist(b, centres).argmin(-1)
        return [moments(b[assign == j]) for j in range(len(centres)) if int((assign == j).sum()) >= 2]

    def _lda_precision(self, counts: torch.Tensor, covs: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Shrunk inverse of the pooled within-class covariance of classes with these counts/covariances."""
        dof = max(1.0, float(counts.sum()) - len(counts))
        within = ((counts - 1)[:, None, None] * covs).sum(0) / dof
        r = max(self.cfg.shrinkage, oas_shrinkage(within, float(counts.sum())))
        return shrunk_precision(within, r), r

    def _stats(self) -> dict:
        """Float64 views and precision matrices derived from the state (cached until it changes)."""
        if not self._cache:
            counts = self.t["count"].double()                                      # (D,)
            means = self.t["mean"].double()                                        # (D, dim)
            covs = self.t["cov"].double()                                          # (D, dim, dim)
            a = self._block()
            ood_prec = [self._ood_precision(cv[:a, :a], float(n)) for cv, n in zip(covs, counts, strict=False)]
            claims = self.t["claim"].double() if "claim" in self.t else torch.full_like(counts, -math.inf)
            bg = self._background_classes(means[:, :a], ood_prec, claims)
            c = {"counts": counts, "means": means, "ood_prec": ood_prec, "n_background": len(bg),
                 "center": (counts[:, None] * means).sum(0) / counts.sum()}          # (dim,)
            if self.cfg.strategy == "lda":
                c["lda_prec"], c["lda_shrinkage"] = self._lda_precision(counts, covs)   # (dim, dim)
            if self.cfg.strategy == "diag":
                var = torch.diagonal(covs, dim1=1, dim2=2)                         # (D, dim)
                c["var"] = var + 0.1 * var.mean(-1, keepdim=True)
            if bg:      # the background test: lda over domains + background components, on the block
                all_counts = torch.cat([counts, torch.tensor([b[0] for b in bg], dtype=torch.float64)])
                c["bg_means"] = torch.cat([means[:, :a]] + [b[1][None] for b in bg])        # (D + B, a)
                all_covs = torch.cat([covs[:, :a, :a]] + [b[2][None] for b in bg])        # (D + B, a, a)
                c["bg_prec"], c["bg_shrinkage"] = self._lda_precision(all_counts, all_covs)
            self._cache.update(c)
        return self._cache

    def _features(self, features) -> Features:
        if not self.names:
            raise RouterError("the router has no domains yet")
        f = _as_features(features)
        if f.pooled.shape[1] != self.dim:
            raise RouterError(f"features have size {f.pooled.shape[1]}, router expects {self.dim}")
        return f

    def scores(self, features) -> torch.Tensor:
        """Score of every domain for each feature row: (n, dim) -> (n, D); larger is closer."""
        x = self._features(features).pooled                                        # (n, dim)
        c = self._stats()
        means = c["means"]
        if self.cfg.strategy == "lda":
            return lda_scores(x, means, c["lda_prec"])                       # (n, D)
        if self.cfg.strategy == "diag":
            return -0.5 * ((x[:, None] - means[None]) ** 2 / c["var"][None]).mean(-1)       # (n, D)
        z = torch.nn.functional.normalize(x - c["center"], dim=-1)                 # (n, dim)
        if self.cfg.strategy == "centroid":
            cen = torch.nn.functional.normalize(means - c["center"], dim=-1)        # (D, dim)
            return _COS_SCALE * z @ cen.T                                          # (n, D)
        p = torch.nn.functional.normalize(self.t["protos"].double() - c["center"], dim=-1)  # (D, k, dim)
        return _COS_SCALE * torch.einsum("nd,akd->nak", z, p).max(-1).values      # (n, D)

    def background_scores(self, features) -> torch.Tensor | None:
        """lda scores of the domains then the background components on the block: (n, D + B), or None
        when the router has no background class."""
        x = self._features(features).pooled                                        # (n, dim)
        c = self._stats()
        if "bg_means" not in c:
            return None
        return lda_scores(x[:, : self._block()], c["bg_means"], c["bg_prec"])

    def route_batch(self, features) -> list[Decision]:
        """One Decision per feature row."""
        f = self._features(features)
        s = self.scores(f)                                                         # (n, D)
        c = self._stats()
        nd, a = len(self.names), self._block()
        prob = torch.softmax(s / self.cfg.temperature, dim=-1)                     # (n, D)
        order = s.argsort(-1, descending=True)                                     # (n, D)
        bgs = self.background_scores(f)                                            # (n, D + B) or None
        if bgs is not None:
            bg_prob = torch.softmax(bgs / self.cfg.temperature, dim=-1)[:, nd:].sum(-1)     # (n,)
            bg_wins = bgs[:, nd:].max(-1).values > bgs[:, :nd].max(-1).values                # (n,)
        out = []
        for row in range(s.shape[0]):
            i = int(order[row, 0])
            j = int(order[row, 1]) if nd > 1 else None
            dist = float(quad_form(f.pooled[row : row + 1, :a], c["means"][i, :a], c["ood_prec"][i])[0])
            ratio = dist / max(float(self.t["threshold"][i]), 1e-12)
            cpt = None if f.chars_per_token is None else float(f.chars_per_token[row])
            reason = ""
            if cpt is not None and cpt < self.noise_min:
                reason = "characters"
            elif bgs is not None and bool(bg_wins[row]):
                reason = "background"
            elif ratio > 1:
                reason = "distance"
            out.append(Decision(domain=BASE if reason else self.names[i], confidence=float(prob[row, i]),
                                runner_up=None if j is None else self.names[j],
                                runner_up_confidence=0.0 if j is None else float(prob[row, j]),
                                best=self.names[i], ood_ratio=ratio, reason=reason,
                                background_confidence=0.0 if bgs is None else float(bg_prob[row])))
        return out

    def route(self, features) -> Decision:
        """The decision for one feature vector (dim,) or a one-row Features."""
        return self.route_batch(features)[0]

    def adapter_for(self, domain: str) -> str | None:
        """Adapter name serving `domain`, None for base."""
        return None if domain == BASE else self.adapters[domain]

    def summary(self) -> dict:
        """What the decision uses now (for reports): background items kept, components, shrinkage."""
        if not self.names:
            return {"domains": []}
        c = self._stats()
        return {"domains": list(self.names), "background_items": 0 if self.background is None else len(self.background),
                "background_kept": c.get("background_kept", 0), "background_components": c["n_background"],
                "lda_shrinkage": c.get("lda_shrinkage"), "background_shrinkage": c.get("bg_shrinkage"),
                "abstain_dims": self._block(), "noise_min_chars_per_token": self.noise_min}

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
                "adapters": self.adapters, "calibration": self.calibration,
                "noise_min_chars_per_token": self.noise_min, "abstain_dims": self.abstain_dims, "meta": self.meta}
        tensors = {k: v.contiguous() for k, v in self.t.items()}
        if self.background is not None:
            tensors["background"] = self.background.contiguous()
        if not tensors:
            tensors["empty"] = torch.zeros(0)
        save_file(tensors, str(folder / "router.safetensors"), metadata={"format": FORMAT})
        (folder / "router.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        return [folder / "router.safetensors", folder / "router.json"]

    @classmethod
    def load(cls, directory: str | Path) -> Router:
        """Load DIR/router (or the router folder itself); fails naming the path when missing."""
        path = Path(directory)
        path = path if (path / "router.json").exists() else path / ROUTER_DIR
        if not (path / "router.json").exists() or not (path / "router.safetensors").exists():
            raise FileNotFoundError(f"{path}: no router here (router.json + router.safetensors); "
                                    f"`crma run` writes one as each domain's phase ends")
        try:
            info = json.loads((path / "router.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RouterError(f"{path / 'router.json'}: not a crma router ({err})") from err
        fmt = info.get("format") if isinstance(info, dict) else None
        if fmt != FORMAT:
            raise RouterError(f"{path / 'router.json'}: not a crma router (format={fmt!r})")
        router = cls(RouterConfig.from_dict(info["config"]), info["dim"], info.get("meta"))
        router.names = list(info["domains"])
        router.adapters = dict(info["adapters"])
        router.calibration = dict(info["calibration"])
        tensors = load_file(str(path / "router.safetensors"))
        tensors.pop("empty", None)
        router.background = tensors.pop("background", None)
        router.t = tensors
        router.noise_min = float(info.get("noise_min_chars_per_token", 0.0))
        router.abstain_dims = info.get("abstain_dims")
        if len(router.t.get("count", [])) != len(router.names):
            raise RouterError(f"{path}: router.json names {len(router.names)} domains, "
                              f"router.safetensors holds {len(router.t.get('count', []))}")
        return router
