"""Routing queries to domain adapters: features, the router, its evaluation.

The three calls below are all that the rest of crma (the run, the model store, the server) uses;
how features are computed and thresholds calibrated stays inside this package.

    router = new_router(model)                                        # empty; background class + noise gate
    update_router(router, model, tokenizer, "medical", "medical", train_texts)   # add (or merge) a domain
    route_texts(router, model, tokenizer, ["What causes anemia?"])    # [Decision(domain, confidence, ...)]
"""
from __future__ import annotations

import hashlib
import time

from ..method.models import fingerprint
from .background import background_for
from .encoders import encode, encoder_spec
from .features import segments_of
from .router import BASE, REASONS, Decision, Features, Router
from .settings import RouterConfig, RouterError


def check_encoder(router: Router, model=None) -> dict:
    """The encoder spec this process computes for `router`; RouterError when the router was built with
    other features (another encoder, layer, base model, or settings). Checked once per router and model."""
    key = (id(model), id(router.meta.get("encoder")))
    if getattr(router, "_checked", None) == key:
        return router.meta["encoder"]
    spec = encoder_spec(router.cfg, model)
    saved = router.meta.get("encoder")
    if saved is not None and saved != spec:
        diff = sorted(k for k in set(spec) | set(saved) if spec.get(k) != saved.get(k))
        raise RouterError(f"router was built with other features than this process computes (differs in: "
                          f"{', '.join(diff)}); rebuild the router")
    router._checked = key
    return spec


def new_router(model, cfg: RouterConfig | None = None, meta: dict | None = None, tokenizer=None) -> Router:
    """An empty router: its encoder settings, the background class and the noise gate. `model` is the base
    model (its fingerprint is recorded; its features, and `tokenizer`, are used only with encoder 'base')."""
    cfg = cfg or RouterConfig()
    spec = encoder_spec(cfg, model)
    info = {"fingerprint": fingerprint(model), "encoder": spec, **(meta or {})}
    if cfg.encoder == "base":
        info["layer"] = spec["layer"]
        if tokenizer is None:
            raise RouterError("new_router: encoder 'base' needs the base model's tokenizer")
    router = Router(cfg, spec["dim"], info)
    router.abstain_dims = spec["abstain_dims"]
    emb, gate, bg_info = background_for(cfg, spec, lambda texts: encode(cfg, texts, model, tokenizer))
    router.set_noise_gate(gate, dict(bg_info.pop("noise", {})))
    if cfg.background != "none":
        router.set_background(emb, bg_info)
    return router


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def calibration_split(texts: list[str], fraction: float, max_calib: int = 0) -> tuple[list[str], list[str]]:
    """(build, calibration) passages of one domain: the calibration share is chosen by content hash, so the
    same passage always lands on the same side whatever the order or the other passages. At least one
    passage on each side when there are two or more."""
    texts = [t for t in texts if t.strip()]
    if len(texts) < 2:
        return texts, []
    k = max(1, min(len(texts) - 1, round(fraction * len(texts))))
    if max_calib:
        k = min(k, max_calib)
    held = set(sorted(range(len(texts)), key=lambda i: _hash(texts[i]))[:k])
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


def domain_texts(texts: list[str], cfg: RouterConfig) -> tuple[list[str], list[str]]:
    """(build segments, calibration segments) of one domain's train passages: the calibration passages
    are a held-back slice of train (calibration_split), every passage cut into query-sized segments."""
    build, calib = calibration_split(texts, cfg.calib_fraction, cfg.max_calib)
    build = build[: cfg.max_passages] if cfg.max_passages else build
    return segments_of(build, cfg), segments_of(calib, cfg)


def update_router(router: Router, model, tokenizer, domain: str, adapter: str,
                  train_texts: list[str], holdout_texts: list[str] | None = None,
                  calib_texts: list[str] | None = None) -> Router:
    """Add domain `domain` (served by `adapter`) from its own train texts, or merge them into its statistics
    when it is already there. No text is kept: only statistics of its features.

    The thresholds are calibrated on a held-back slice of `train_texts` (router.cfg.calib_fraction), or on
    `calib_texts` when given (other train-side passages, e.g. cl5's pool.jsonl). `holdout_texts` are never
    used: evaluation queries are drawn from holdout documents, and calibrating on them would flatter it."""
    cfg = router.cfg
    check_encoder(router, model)
    started = time.perf_counter()
    if calib_texts is not None:
        texts = [t for t in train_texts if t.strip()]
        build = segments_of(texts[: cfg.max_passages] if cfg.max_passages else texts, cfg)
        calib = segments_of(calib_texts[: cfg.max_calib] if cfg.max_calib else calib_texts, cfg)
    else:
        build, calib = domain_texts(train_texts, cfg)
    if len(build) < 2:
        raise RouterError(f"domain {domain!r}: need at least 2 text segments to build from, got {len(build)} "
                          f"(from {len(train_texts)} passages)")
    feats = encode(cfg, build, model, tokenizer)
    held = encode(cfg, calib, model, tokenizer) if calib else None
    if domain in router.names:
        router.merge_domain(domain, feats, held)
    else:
        router.add_domain(domain, feats, held, adapter=adapter)
    entry = router.calibration[domain]
    entry["build_seconds"] = round(time.perf_counter() - started, 3)
    entry["calibration_source"] = "calib_texts" if calib_texts is not None else "held-back train slice"
    entry["holdout_used"] = False
    return router


def route_texts(router: Router, model, tokenizer, texts: list[str], batch_size: int = 32) -> list[Decision]:
    """One routing Decision per text. Empty or whitespace-only texts go to base with reason 'empty'."""
    check_encoder(router, model)
    out: list[Decision | None] = [None] * len(texts)
    real = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    if real:
        decisions = router.route_batch(encode(router.cfg, [texts[i] for i in real], model, tokenizer, batch_size))
        for i, dec in zip(real, decisions, strict=False):
            out[i] = dec
    for i, dec in enumerate(out):
        if dec is None:
            out[i] = Decision(BASE, 0.0, None, 0.0, None, 0.0, "empty", 0.0)
    return out


REASON_TEXT = {"characters": "too few characters per token: noise or another script, not a domain's text",
           "background": "closer to everyday English (the background class) than to any domain",
           "distance": "too far from the nearest domain (beyond its calibrated distance threshold)",
           "empty": "nothing to route on (an empty text, or a router without domains)"}


def explain_text(router: Router, model, tokenizer, text: str) -> dict:
    """Everything the router weighs for one text: each domain's probability p_d = softmax(s / T)_d over
    the domains' scores s, the background class's probability, the decision and, when it abstains, why.
    Domains are listed most probable first."""
    feats = None
    if text.strip() and router.names:
        check_encoder(router, model)
        feats = encode(router.cfg, [text], model, tokenizer)
        dec = router.route_batch(feats)[0]
    else:
        dec = Decision(BASE, 0.0, None, 0.0, None, 0.0, "empty", 0.0)
    out = {"decision": dec.domain, "best": dec.best, "confidence": dec.confidence, "runner_up": dec.runner_up,
           "runner_up_confidence": dec.runner_up_confidence, "background": dec.background_confidence,
           "ood_ratio": dec.ood_ratio, "reason": dec.reason or None,
           "why": REASON_TEXT.get(dec.reason, f"{dec.domain} scored highest and is within its distance threshold"),
           "domains": []}
    if feats is not None:
        scores = router.scores(feats)[0]                                                     # (D,)
        probs = (scores / router.cfg.temperature).softmax(-1)                                # (D,)
        out["domains"] = sorted(({"domain": d, "score": float(scores[i]), "probability": float(probs[i])}
                                 for i, d in enumerate(router.names)), key=lambda r: -r["probability"])
    return out


__all__ = ["BASE", "REASONS", "REASON_TEXT", "Decision", "Features", "Router", "RouterConfig", "RouterError",
           "calibration_split", "check_encoder", "explain_text", "new_router", "update_router", "route_texts"]
