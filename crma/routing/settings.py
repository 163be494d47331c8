"""The router's settings (`RouterConfig`, validated) and its error type."""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..config import ConfigError

STRATEGIES = ("lda", "diag", "centroid", "kproto")
ENCODER_NAMES = ("minilm", "base")
BACKGROUNDS = ("chatterbot", "none")


class RouterError(ValueError):
    """A router setting or state that cannot work."""


@dataclass
class RouterConfig:
    """How the router is built and decides. Defaults chosen by measurement (benchmarks/route_measure.py,
    results in benchmarks/results/router/)."""

    encoder: str = "minilm"         # minilm (all-MiniLM-L6-v2 sentence embedding) | base (base model block `layer`)
    mix_layer: int = 3              # minilm: also this hidden layer's mean (-1: none), to choose the domain
    strategy: str = "lda"           # lda | diag | centroid | kproto
    layer: int = 6                  # encoder base: hidden state after block `layer` (0 = embeddings, -1 = last)
    max_tokens: int = 64            # queries (and passage segments) are truncated to this many tokens
    min_words: int = 6              # passages are cut into sentence/line segments of at least this many words
    segments_per_passage: int = 8   # at most this many segments from each passage
    max_passages: int = 100         # train passages per domain used for its statistics (0 = all); cl5: 100 gave
                                    # 99.0% accuracy, 96.9% OOD to base (dev); 400: 99.2%, 95.0% (more passages
                                    # weigh the domains' covariance more in the background test)
    calib_fraction: float = 0.2     # share of a domain's train passages held back to calibrate its thresholds
    max_calib: int = 25             # at most this many held-back passages (0 = no limit)
    quantile: float = 0.99          # abstain threshold t_d = slack * this quantile of held-back distances
    slack: float = 1.5
    claim_quantile: float = 0.5     # c_d: background items closer than this quantile of d's held-back distances
                                    # are d's, not background
    shrinkage: float = 0.02         # lda: floor of r for the pooled covariance
    ood_shrinkage: float = 0.01     # floor of r for each domain's own covariance (distance test)
    prototypes: int = 4             # kproto: prototypes per domain
    temperature: float = 0.02       # confidence = softmax(score / temperature) (display only: decisions are
                                    # argmaxes); cl5 queries: median top-2 score gap 0.07 -> ~0.95
    background: str = "chatterbot"  # chatterbot | none: out-of-scope examples as a class of their own
    background_components: int = 8  # k-means components of the background class

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"router.{name}: {msg}")
        check(self.encoder in ENCODER_NAMES, "encoder",
              f"must be one of {', '.join(ENCODER_NAMES)}, got {self.encoder!r}")
        check(self.strategy in STRATEGIES, "strategy", f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        check(self.background in BACKGROUNDS, "background",
              f"must be one of {', '.join(BACKGROUNDS)}, got {self.background!r}")
        check(self.max_tokens >= 2, "max_tokens", f"must be >= 2, got {self.max_tokens}")
        check(self.min_words >= 1, "min_words", f"must be >= 1, got {self.min_words}")
        check(self.segments_per_passage >= 1, "segments_per_passage", "must be >= 1")
        check(self.max_passages >= 0 and self.max_calib >= 0, "max_passages", "must be >= 0")
        check(0 < self.calib_fraction < 1, "calib_fraction", f"must be in (0, 1), got {self.calib_fraction}")
        check(0 < self.quantile <= 1, "quantile", f"must be in (0, 1], got {self.quantile}")
        check(0 <= self.claim_quantile <= 1, "claim_quantile", f"must be in [0, 1], got {self.claim_quantile}")
        check(self.slack > 0, "slack", f"must be > 0, got {self.slack}")
        for name in ("shrinkage", "ood_shrinkage"):
            check(0 <= getattr(self, name) <= 1, name, f"must be in [0, 1], got {getattr(self, name)}")
        check(self.prototypes >= 1, "prototypes", f"must be >= 1, got {self.prototypes}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.background_components >= 1, "background_components", "must be >= 1")

    @classmethod
    def from_dict(cls, d: dict) -> RouterConfig:
        """From a saved dict; unknown keys (a newer crma) are ignored, missing ones take defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
