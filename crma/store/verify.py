"""Which parts of a store can be served: every current file checked against its recorded sha256, per part.

One damaged file takes out only what needs it: a domain (its adapter files and the backbone version it is
served on), the router (then `auto` cannot route), or the newest backbone (then the base model and the
domains served on it). `crma serve`, `crma eval` and `crma store show|verify` all read this.

    damage = damaged_parts(Store("models/clinic"))
    damage.domains        # {"legal": "adapters/legal/v1/adapter_model.safetensors: sha256 mismatch ..."}
    damage.router         # None, or why the current router cannot be used
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .paths import StoreError, verify_files
from .store import Store


@dataclass
class Damage:
    router: str | None = None                                  # why the current router cannot be used
    backbone: str | None = None                                # why the newest backbone cannot be used
    domains: dict[str, str] = field(default_factory=dict)      # domain -> why it cannot be served

    def __bool__(self) -> bool:
        return bool(self.router or self.backbone or self.domains)

    def to_dict(self) -> dict:
        return {"router": self.router, "backbone": self.backbone, "domains": dict(self.domains)}


def _problem(store: Store, files: dict[str, str]) -> str | None:
    """None when every file is whole, else the first problem, its path relative to the store."""
    try:
        verify_files(store.root, files)
    except StoreError as err:
        return str(err).replace(f"{store.root}/", "")
    return None


def damaged_parts(store: Store, backbone: str = "pinned") -> Damage:
    """Check every file the current manifest serves, grouped by what each file is needed for."""
    damage = Damage()
    router = store.router_meta()
    if router is not None:
        damage.router = _problem(store, router["files"])
    newest = store.backbone_version(None)
    backbones = {}
    if newest is not None:
        backbones[newest] = _problem(store, store.backbone_meta(newest)["files"])
        damage.backbone = backbones[newest]
    for domain in store.domains():
        meta = store.adapter_meta(domain)
        why = _problem(store, meta["files"])
        version = store.backbone_version(domain, backbone)
        if why is None and version is not None:
            if version not in backbones:
                backbones[version] = _problem(store, store.backbone_meta(version)["files"])
            why = backbones[version] and f"its backbone v{version}: {backbones[version]}"
        if why:
            damage.domains[domain] = why
    return damage
