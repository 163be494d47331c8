"""Routing queries to domain adapters: features, the router, its evaluation.

The three calls below are all that the rest of crma (the run, the model store, the server) uses;
how features are computed and thresholds calibrated stays inside this package.
"""
from __future__ import annotations

from .router import BASE, Decision, Router, RouterConfig, RouterError


def new_router(model, cfg: RouterConfig | None = None, meta: dict | None = None) -> Router:
    """An empty router for `model` (the base model whose features it routes on)."""
    from ..method.models import fingerprint
    from .features import resolve_layer

    cfg = cfg or RouterConfig()
    return Router(cfg, meta={"fingerprint": fingerprint(model), "layer": resolve_layer(model, cfg.layer),
                             **(meta or {})})


def update_router(router: Router, model, tokenizer, domain: str, adapter: str,
                  train_texts: list[str], holdout_texts: list[str] | None = None) -> Router:
    """Add domain `domain` (served by `adapter`) from its own texts, or merge them into its statistics
    when it is already there. No text is kept: only statistics of its features."""
    import time

    from .features import domain_features

    cfg = router.cfg
    started = time.perf_counter()
    feats = domain_features(model, tokenizer, train_texts, cfg, cfg.max_passages)
    calib = domain_features(model, tokenizer, holdout_texts, cfg, cfg.max_calib) if holdout_texts else None
    if domain in router.names:
        router.merge_domain(domain, feats, calib)
    else:
        router.add_domain(domain, feats, calib, adapter=adapter)
    router.calibration[domain]["build_seconds"] = round(time.perf_counter() - started, 3)
    return router


def route_texts(router: Router, model, tokenizer, texts: list[str], batch_size: int = 16) -> list[Decision]:
    """One routing Decision per text."""
    from .features import hidden_features

    cfg = router.cfg
    return router.route_batch(hidden_features(model, tokenizer, texts, cfg.layer, cfg.max_tokens, batch_size))


__all__ = ["BASE", "Decision", "Router", "RouterConfig", "RouterError", "new_router", "update_router", "route_texts"]
