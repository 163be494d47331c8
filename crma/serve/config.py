"""The server's settings and limits; `crma serve` takes one option per field (crma/cli/serve.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, DeviceConfig, opt


@dataclass
class ServeConfig:
    store: Path = opt(help="the model store folder")
    host: str = opt("127.0.0.1", help="address to listen on")
    port: int = opt(8000)
    admin_token: str | None = opt(None, help="enables POST /admin/reload with 'Authorization: Bearer TOKEN' "
                                             "(default: $CRMA_ADMIN_TOKEN; without a token the admin endpoints "
                                             "do not exist)")
    max_batch: int = opt(16, help="rows decoded together")
    max_queue: int = opt(64, help="requests waiting for a batch slot; beyond it 503 + Retry-After")
    max_prompt_tokens: int = opt(2048)
    max_tokens: int = opt(512, help="largest max_tokens a request may ask for")
    default_max_tokens: int = opt(128, help="for chat requests without max_tokens (completions default to 16, "
                                            "as OpenAI's)")
    max_body_bytes: int = opt(1 << 20)
    watch: bool = opt(False, help="reload by itself when the store's manifest changes")
    watch_interval: float = opt(1.0, help="seconds between manifest checks")
    backbone: str = opt("pinned", choices=("pinned", "latest"),
                        help="backbone version for each domain: the one its adapter was trained with, or the newest")
    batching: str = opt("mixed", choices=("mixed", "per-adapter"),
                        help="per-adapter: one adapter at a time (a baseline for benchmarks)")
    lora_mixing: str = opt("peft", choices=("peft", "gather"),
                           help="LoRA in a batch of several adapters: PEFT's adapter_names or stacked weights "
                                "gathered per row (faster with many adapters per batch)")
    threads: int | None = opt(None, help="torch threads (default: torch's own choice)")
    device: DeviceConfig = field(default_factory=DeviceConfig)   # --device, --dtype, --load-in-4bit

    def __post_init__(self) -> None:
        self.store = Path(self.store)
        for name in ("max_batch", "max_queue", "max_prompt_tokens", "max_tokens", "default_max_tokens",
                     "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name, allowed in (("backbone", ("pinned", "latest")), ("batching", ("mixed", "per-adapter")),
                              ("lora_mixing", ("peft", "gather"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
