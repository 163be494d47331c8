"""`crma route-proxy`: crma's router in front of another OpenAI-compatible server (vLLM serving a `crma export`).

    client --model auto--> proxy: route the request's text with the store's router -> model = medical
                           proxy --model medical--> upstream (vLLM) --> answer (+ the `crma` object) --> client

The proxy holds the store's router and nothing else of the model: with the default MiniLM encoder that is
22.7M parameters, independent of the base model; only a router built with encoder `base` (the base model's
own hidden states) makes it load the base model. Requests for a domain or `base` are passed on unchanged;
`auto` requests get `model` set to the router's choice. Every response (each streamed chunk too) gets the
`crma` object `crma serve` returns: domain, confidence, runner-up, why it abstained, adapter and backbone
versions, the requested model, the manifest it was decided with.

With `--export DIR` (a `crma export` folder) the models, versions and upstream names are those of the
export (what the upstream really serves) and `auto` chooses only among exported domains; without it they
are the store's current ones (the names a default export gives: the domain names and `base`). Both files
are re-read when they change, so a `crma add`, re-export and hot add reach the proxy without a restart.
"""
from __future__ import annotations

import copy
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, opt
from ..method.models import load_model
from ..routing import BASE, route_texts
from ..store import MANIFEST, Store
from .auth import ApiKey
from .protocol import APIError

AUTO = "auto"


@dataclass
class ProxyConfig:
    store: Path = opt(help="the model store whose router decides `auto` requests")
    upstream: str = opt(help="base URL of the OpenAI-compatible server to forward to, e.g. http://127.0.0.1:8001 "
                             "(with or without /v1)")
    export: Path | None = opt(None, help="the `crma export` folder the upstream serves: its models, versions and "
                                         "names (default: the store's current domains, named as a default export "
                                         "names them)")
    host: str = opt("127.0.0.1", help="address to listen on")
    port: int = opt(8100)
    upstream_key_file: Path | None = opt(None, help="the upstream's API key (first line of this file; or "
                                                    "$CRMA_UPSTREAM_KEY); without one, a client's Authorization "
                                                    "header is passed on when the proxy has no keys of its own")
    api_key_file: Path | None = opt(None, help="the proxy's own API keys, one a line: KEY [DOMAIN,...] "
                                               "(as crma serve; $CRMA_API_KEY too)")
    timeout: float = opt(600.0, help="seconds to wait for the upstream's answer (or its next streamed chunk)")
    max_body_bytes: int = opt(4 << 20, help="largest request body accepted")

    def __post_init__(self):
        self.upstream = self.upstream.rstrip("/")
        if not self.upstream.startswith(("http://", "https://")):
            raise ConfigError(f"--upstream {self.upstream!r}: expected an http:// or https:// URL")
        if not self.upstream.endswith("/v1"):
            self.upstream += "/v1"

    def upstream_key(self, environ=os.environ) -> str | None:
        if self.upstream_key_file is not None:
            try:
                return Path(self.upstream_key_file).read_text(encoding="utf-8").splitlines()[0].strip()
            except (OSError, IndexError, UnicodeDecodeError) as err:
                raise ConfigError(f"--upstream-key-file: cannot read a key from {self.upstream_key_file}: "
                                  f"{err}") from None
        return environ.get("CRMA_UPSTREAM_KEY") or None


@dataclass
class Target:
    """What one model name is served with upstream, as the `crma` object reports it."""

    upstream: str                      # the `model` the upstream is sent
    adapter: str | None
    adapter_version: int | None
    backbone_version: int | None


class Routes:
    """The store's router and the models the proxy serves, as of one manifest (and export.json)."""

    def __init__(self, cfg: ProxyConfig, stamp: tuple, encoder: tuple | None = None):
        store = Store(cfg.store)
        self.stamp, self.updated = stamp, store.manifest.get("updated")
        self.targets: dict[str, Target] = {}
        if cfg.export is not None:
            record = _read_export(cfg.export, store)
            for name, m in record["models"].items():
                self.targets[name] = Target(name, m["adapter"], m["version"], m["backbone_version"])
            if BASE not in self.targets:
                self.targets[BASE] = Target(record["base_model_name"], None, None, None)
            self.export_manifest = record["manifest"].get("updated")
        else:
            for domain in store.domains():
                meta = store.adapter_meta(domain)
                self.targets[domain] = Target(domain, store.adapter_name(domain), meta["version"],
                                              store.backbone_version(domain))
            self.targets[BASE] = Target(BASE, None, None, store.backbone_version(None))
            self.export_manifest = None
        router = store.router()
        if router is not None:
            router = _subset(router, frozenset(d for d in self.targets if d != BASE))
        self.router = router
        self.encoder: tuple = (None, None)               # (model, tokenizer): only for encoder `base`
        if router is not None and router.cfg.encoder == "base":     # features are the base model's hidden states
            self.encoder = encoder if encoder and encoder[0] is not None else \
                load_model(store.model_spec, seed=store.manifest["settings"].get("seed", 0))
        self._subsets: dict = {}
        self._lock = threading.Lock()                  # one routing at a time (the encoder is not thread-safe)

    def models(self) -> list[str]:
        return [m for m in self.targets if m != BASE] + [AUTO, BASE]

    def decide(self, model: str, texts: list[str] | None, key: ApiKey | None) -> tuple[str, dict]:
        """(the upstream `model`, the `crma` object) for a request naming `model` (auto: routed on `texts`)."""
        if model != AUTO:
            if model not in self.targets:
                raise APIError(404, f"The model '{model}' does not exist; this proxy serves: "
                                    f"{', '.join(self.models())}", param="model", code="model_not_found")
            return self.targets[model].upstream, self.info(model, model)
        if texts is None:
            raise APIError(400, "model 'auto' routes on text: send the prompt as text, not token ids",
                           param="prompt", code="invalid_value")
        router = self.router if key is None or key.domains is None else _subset(self.router, key.domains, self._subsets)
        if router is None or not router.names:
            return self.targets[BASE].upstream, self.info(BASE, AUTO)
        with self._lock:
            decisions = route_texts(router, *self.encoder, texts)
        if len({d.domain for d in decisions}) > 1:
            raise APIError(400, "the prompts of this request route to different domains ("
                                f"{', '.join(d.domain for d in decisions)}); send them one at a time",
                           param="prompt", code="mixed_routes")
        dec = decisions[0]
        domain = dec.domain if dec.domain in self.targets else BASE
        return self.targets[domain].upstream, self.info(domain, AUTO, float(dec.confidence), dec.runner_up,
                                                        dec.reason or None)

    def info(self, domain: str, requested: str, confidence: float | None = None, runner_up: str | None = None,
             reason: str | None = None) -> dict:
        """The `crma` object of crma serve (crma/serve/scheduler.py Request.info), plus the upstream model."""
        t = self.targets[domain]
        return {"domain": domain, "confidence": confidence, "runner_up": runner_up, "reason": reason,
                "adapter": t.adapter, "adapter_version": t.adapter_version, "backbone_version": t.backbone_version,
                "requested": requested, "manifest_updated": self.export_manifest or self.updated,
                "upstream_model": t.upstream}


def _subset(router, domains: frozenset[str], cache: dict | None = None):
    """The router, or a copy that knows only `domains` (None when it knows none of them)."""
    keep = frozenset(d for d in router.names if d in domains)
    if keep == frozenset(router.names):
        return router
    if not keep:
        return None
    if cache is not None and keep in cache:
        return cache[keep]
    sub = copy.deepcopy(router)
    for name in [n for n in sub.names if n not in keep]:
        sub.remove_domain(name)
    if cache is not None:
        cache[keep] = sub
    return sub


def _read_export(folder: Path, store: Store) -> dict:
    path = Path(folder) / "export.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--export: cannot read {path}: {err}") from None
    if Path(record.get("store", "")) != store.root.resolve():
        raise ConfigError(f"--export: {path} is the export of {record.get('store')}, not of {store.root.resolve()}")
    return record


def stamp_of(cfg: ProxyConfig) -> tuple:
    """What a reload watches: the manifest's (and export.json's) modification time and size."""
    paths = [Path(cfg.store) / MANIFEST] + ([Path(cfg.export) / "export.json"] if cfg.export else [])
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


class Proxy:
    """The proxy's state: its settings, keys and the current Routes (rebuilt when the files change)."""

    def __init__(self, cfg: ProxyConfig, keys: tuple[ApiKey, ...] = ()):
        self.cfg, self.keys = cfg, keys
        self.upstream_key = cfg.upstream_key()
        self.routes = Routes(cfg, stamp_of(cfg))
        self._lock = threading.Lock()
        self.reload_error: str | None = None

    def current(self) -> Routes:
        """The Routes of the files as they are now (rebuilt, once, when they changed; a store or export that
        cannot be read keeps the previous Routes and says why in /health)."""
        stamp = stamp_of(self.cfg)
        if stamp != self.routes.stamp:
            with self._lock:
                if stamp != self.routes.stamp:
                    try:
                        self.routes = Routes(self.cfg, stamp, self.routes.encoder)
                        self.reload_error = None
                    except (ConfigError, ValueError, OSError) as err:
                        self.reload_error = str(err)
                        self.routes.stamp = stamp
        return self.routes
