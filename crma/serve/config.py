"""The server's settings and limits; `crma serve` takes one option per field (crma/cli/serve.py)."""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, DeviceConfig, opt

log = logging.getLogger("crma.serve")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
BATCHING = ("mixed", "per-adapter")
LORA_MIXING = ("gather", "peft")
PACKED_LINEARS = ("on", "float16", "off")


@dataclass
class ServeConfig:
    store: Path = opt(help="the model store folder")
    host: str = opt("127.0.0.1", help="address to listen on")
    port: int = opt(8000)
    admin_token: str | None = opt(None, help="enables POST /admin/reload with 'Authorization: Bearer TOKEN'; on "
                                             "the command line every local user can read it in the process "
                                             "list: prefer --admin-token-file or $CRMA_ADMIN_TOKEN (without a "
                                             "token the admin endpoints do not exist)")
    admin_token_file: Path | None = opt(None, help="read the admin token from this file (its first line)")
    api_key: list[str] = opt([], metavar="KEY[=DOMAIN,...]",
                             help="inference API key (repeatable), optionally limited to some domains; visible in "
                                  "the process list: prefer --api-key-file or $CRMA_API_KEY (without keys /v1 is "
                                  "open to whoever can reach the address)")
    api_key_file: Path | None = opt(None, help="API keys, one a line: KEY [DOMAIN,...] (# comments); mode 600")
    metrics_token: str | None = opt(None, help="bearer token for GET /metrics (default: any API key; without keys "
                                               "and token /metrics is open)")
    route_log: Path | None = opt(None, help="routing log: one JSON line per request (no text unless --log-text)")
    route_log_bytes: int = opt(10 << 20, help="rotate the routing log at this size")
    route_log_backups: int = opt(5, help="rotated routing logs kept")
    log_text: bool = opt(False, help="also write each request's prompt and answer to the routing log")
    allowed_hosts: tuple[str, ...] | None = opt(None, help="comma list of names the Host header may carry, besides "
                                                  "localhost, 127.0.0.1, ::1 and --host ('*' allows any; "
                                                  "'*.example.com' a domain's subdomains); also the origins "
                                                  "a browser request may come from")
    max_batch: int = opt(16, help="rows decoded together")
    max_queue: int = opt(64, help="requests waiting for a batch slot; beyond it 503 + Retry-After")
    max_prompt_tokens: int = opt(2048)
    max_tokens: int = opt(512, help="largest max_tokens a request may ask for")
    default_max_tokens: int = opt(128, help="for chat requests without max_tokens (completions default to 16, "
                                            "as OpenAI's)")
    max_body_bytes: int = opt(1 << 20)
    max_header_bytes: int = opt(16 << 10, help="largest request line and headers")
    max_connections: int = opt(128, help="open connections; beyond it new connections and requests get 503")
    timeout_keep_alive: float = opt(5.0, help="seconds an idle connection stays open between requests")
    timeout_headers: float = opt(10.0, help="seconds a client has to send a request's line and headers "
                                            "(else 408 and the connection is closed)")
    timeout_body: float = opt(30.0, help="seconds a client has to send a request's body (else 408)")
    ui: bool = opt(True, help="the web console at /ui (its data needs an API key when keys are set)")
    results: Path | None = opt(None, help="a benchmark results folder (crma bench/report --out) the console shows")
    watch: bool = opt(False, help="reload by itself when the store's manifest changes")
    watch_interval: float = opt(1.0, help="seconds between manifest checks")
    backbone: str = opt("pinned", choices=("pinned", "latest"),
                        help="backbone version for each domain: the one its adapter was trained with, or the newest")
    versions: bool = opt(False, help="also serve every registered version of each domain as DOMAIN@vK (on the "
                                      "backbone version it was trained with), for comparing versions; each holds "
                                      "its adapter weights in memory")
    batching: str = opt("mixed", choices=BATCHING,
                        help="per-adapter: one adapter at a time (a baseline for benchmarks)")
    lora_mixing: str = opt("gather", choices=LORA_MIXING,
                           help="LoRA of a batch's rows: each row's slice of the stacked adapter weights, one pair "
                                "of batched matmuls per layer whatever the adapter mix, or PEFT's adapter_names loop "
                                "(the reference)")
    packed_linears: str = opt("on", choices=PACKED_LINEARS,
                              help="linear layers on the CPU as GEMMs on weights packed once (faster than F.linear, "
                                   "most for a few rows): on: oneDNN, in the model's dtype (holds the linear weights "
                                   "twice); float16: the float32 weights packed as float16, computed in float32 "
                                   "(FBGEMM; half the bytes a token reads, faster decoding, outputs rounded like "
                                   "llama.cpp's F16 files); off: F.linear (docs/serving.md)")
    row_gemv: bool = opt(True, help="one-row steps (a single stream) through linear kernels compiled by torch's "
                                     "inductor at start (a few seconds; needs a C++ compiler, else oneDNN stays), "
                                     "which read the weights faster than oneDNN on one row (docs/serving.md)")
    decode_step: bool = opt(True, help="decoding steps of Llama-family models (llama, mistral, qwen2) in crma's own "
                                       "torch code rather than transformers' forward (the same arithmetic with less "
                                       "overhead; docs/serving.md)")
    prefix_cache_mb: int = opt(256, help="memory for reused prompt prefixes' KV (the chat template's system prompt "
                                         "per adapter and backbone version); 0: off")
    threads: int | None = opt(None, help="torch threads, set once (default: $OMP_NUM_THREADS when set, else every "
                                         "core the process may use)")
    device: DeviceConfig = field(default_factory=DeviceConfig)   # --device, --dtype, --load-in-4bit

    def __post_init__(self) -> None:
        self.store = Path(self.store)
        self.api_key = list(self.api_key or [])
        self.route_log = Path(self.route_log) if self.route_log else None
        self.results = Path(self.results) if self.results else None
        if self.results is not None and not (self.results / "report.md").is_file():
            raise ConfigError(f"--results {self.results}: no report.md there (make one with crma report --out DIR)")
        for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_tokens", "default_max_tokens",
                     "max_body_bytes", "max_header_bytes", "max_connections", "route_log_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("timeout_keep_alive", "timeout_headers", "timeout_body"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number of seconds, got {value}")
        for name, allowed in (("backbone", ("pinned", "latest")), ("batching", BATCHING),
                              ("lora_mixing", LORA_MIXING), ("packed_linears", PACKED_LINEARS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        self.allowed_hosts = tuple(h.strip().lower() for h in self.allowed_hosts or () if h.strip())
        for pattern in self.allowed_hosts:
            if "*" in pattern[1:] or (pattern.startswith("*") and pattern != "*" and not pattern.startswith("*.")):
                raise ConfigError(f"--allowed-hosts: {pattern!r}: a wildcard must be '*' or like '*.example.com'")
        if self.admin_token_file is not None:
            if self.admin_token:
                raise ConfigError("give the admin token once: --admin-token or --admin-token-file, not both")
            self.admin_token_file = Path(self.admin_token_file)
            self.admin_token = read_token_file(self.admin_token_file)
        if self.packed_linears == "float16" and self.device.dtype not in ("auto", "float32"):
            raise ConfigError(f"--packed-linears float16 packs float32 weights; --dtype {self.device.dtype} has none "
                              "(use --dtype float32)")
        if self.admin_token is not None and not self.admin_token.strip():
            raise ConfigError("the admin token is empty")

    def host_names(self) -> tuple[str, ...]:
        """The names a request's Host header (and a browser's Origin) may carry: loopback, the bound host
        (unless it is a wildcard address) and --allowed-hosts; IPv6 literals also in brackets."""
        names = [*LOOPBACK_NAMES, *self.allowed_hosts]
        if self.host and self.host not in ("0.0.0.0", "::", ""):
            names.append(self.host.lower())
        names += [f"[{n}]" for n in names if ":" in n and not n.startswith("[")]
        return tuple(dict.fromkeys(names))


def read_token_file(path: Path) -> str:
    """The admin token: the first line of `path`, which must not be readable by other users."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--admin-token-file: cannot read {path}: {err}") from None
    token = text.splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise ConfigError(f"--admin-token-file: {path} is empty")
    if os.name == "posix" and Path(path).stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s is readable by other users (chmod 600 it)", path)
    return token
