"""The server's settings and limits (light: importing it does not import torch, so the `crma` parser stays fast)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import DeviceConfig


@dataclass
class ServeConfig:
    store: Path
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: str | None = None          # None: no admin endpoints
    max_batch: int = 16                     # rows decoded together
    max_queue: int = 64                     # requests waiting beyond the batch; more get 503
    max_prompt_tokens: int = 2048
    max_tokens: int = 512                   # largest max_tokens a request may ask for
    default_max_tokens: int = 128           # chat requests without max_tokens (completions: 16, as OpenAI)
    max_body_bytes: int = 1 << 20
    watch: bool = False
    watch_interval: float = 1.0
    backbone: str = "pinned"                # pinned | latest
    batching: str = "mixed"                 # mixed | per-adapter (the benchmark's baseline)
    lora_mixing: str = "peft"               # peft (adapter_names) | gather (stacked weights, lora_rows.py)
    threads: int | None = None              # torch threads (None: torch's default)
    device: DeviceConfig = field(default_factory=DeviceConfig)   # --device, --dtype, --load-in-4bit

    def __post_init__(self) -> None:
        self.store = Path(self.store)
        if self.backbone not in ("pinned", "latest"):
            raise ValueError(f"backbone must be pinned or latest, got {self.backbone!r}")
        if self.batching not in ("mixed", "per-adapter"):
            raise ValueError(f"batching must be mixed or per-adapter, got {self.batching!r}")
        if self.lora_mixing not in ("peft", "gather"):
            raise ValueError(f"lora_mixing must be peft or gather, got {self.lora_mixing!r}")
