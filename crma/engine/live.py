"""A store's model in memory: the base model, its CRMA backbone at any version, and domain adapters.

    live = LiveModel.open(Store("models/clinic"))        # base model + backbone; adapters load on use
    with live.using("medical", backbone="pinned"):       # medical's adapter on the backbone it was trained with
        live.model(**batch)
    with live.using(None):                               # no domain adapter (the newest backbone)
        ...

Switching a backbone version copies its ~n*(2d + n) + 1 parameters per block into the attached
backbone (0.55 MB for SmolLM2-135M); every version's state is read once, checksum verified, and cached.
The same object is what `crma add` trains on, what `crma run` evaluates, and what `generate` serves.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from peft import PeftModel

from ..config import CRMAConfig, DeviceConfig
from ..method.adapters import active, load_adapter
from ..method.backbone import BACKBONE_FILE, CRMABackbone
from ..method.models import base_model, fingerprint
from ..runtime import load_placed
from ..store import Store, StoreError, verify_files


class LiveModel:
    def __init__(self, model, tokenizer, spec: str, condition: str, store: Store | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.spec, self.condition = spec, condition
        self.store = store
        self.backbone: CRMABackbone | None = None
        self.backbone_states: dict[int, dict[str, torch.Tensor]] = {}   # version -> state (cache)
        self.backbone_loaded: int | None = None      # version whose state the attached backbone holds
        self.adapters: dict[str, int] = {}           # in-memory adapter name -> store version it holds
        self.base_fingerprint = fingerprint(model)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def fresh(cls, spec: str, condition: str, seed: int = 0, device: DeviceConfig | None = None) -> LiveModel:
        """The untouched base model (a new store's first add, or a run), placed as `device` says."""
        model, tokenizer = load_placed(spec, device, seed=seed)
        return cls(model, tokenizer, spec, condition)

    @classmethod
    def open(cls, store: Store, seed: int | None = None, device: DeviceConfig | None = None,
             damaged_ok: bool = False) -> LiveModel:
        """Load the store's base model (checking its fingerprint) and its newest backbone. With `damaged_ok`
        (a server, an evaluation: they serve what is whole) a damaged newest backbone is left unloaded, and
        only what needs it fails, when it is used; otherwise it is an error here."""
        seed = store.manifest["settings"].get("seed", 0) if seed is None else seed
        model, tokenizer = load_placed(store.model_spec, device, seed=seed)
        got = fingerprint(model)
        if got != store.fingerprint:
            old = "weights_sha256" in store.fingerprint
            raise StoreError(f"{store.root / 'manifest.json'}: the store was built on base model "
                             f"{store.fingerprint}, but {store.model_spec!r} loads as {got}"
                             + ("; this store was made by crma before fingerprints hashed bf16-rounded weights "
                                "(so that one store opens in fp32 and bf16): rebuild it with `crma add`"
                                if old else ""))
        live = cls(model, tokenizer, store.model_spec, store.condition, store)
        current = store.manifest["backbone"]["current"]
        if current is not None:
            live.create_backbone(CRMAConfig(**store.manifest["settings"]["crma"]))
            try:
                live.set_backbone(current)
            except StoreError:
                if not damaged_ok:
                    raise
        return live

    def create_backbone(self, cfg: CRMAConfig, seed: int = 0) -> CRMABackbone:
        """Attach a fresh backbone (identity at init) to the model."""
        base = base_model(self.model)
        self.backbone = CRMABackbone.for_model(base, cfg, seed=seed).attach(base)
        return self.backbone

    # ---- backbone versions ------------------------------------------------------------------
    def remember_backbone(self, version: int) -> None:
        """The attached backbone's current state is `version` (just trained and saved)."""
        self.backbone_states[version] = {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}
        self.backbone_loaded = version

    def backbone_state(self, version: int, store: Store | None = None) -> dict[str, torch.Tensor]:
        """The saved state of backbone `version` (read once, checksum verified, cached), without
        changing what the attached backbone holds. `store` (default self.store) is the manifest to read."""
        store = store or self.store
        if version not in self.backbone_states:
            if store is None:
                raise StoreError(f"backbone version {version} is not in memory and there is no store to read it from")
            meta = store.backbone_meta(version)
            verify_files(store.root, meta["files"])
            self.backbone_states[version] = self.backbone.load_version(store.root / meta["path"] / BACKBONE_FILE)
        return self.backbone_states[version]

    @torch.no_grad()
    def set_backbone(self, version: int | None) -> None:
        """Make the attached backbone hold `version` (None: keep what it holds)."""
        if version is None or self.backbone is None or version == self.backbone_loaded:
            return
        state = self.backbone_state(version)
        for name, p in self.backbone.state_dict(keep_vars=True).items():
            p.copy_(state[name])
        self.backbone_loaded = version

    # ---- adapters ---------------------------------------------------------------------------
    def ensure_adapter(self, adapter: str, version: int) -> None:
        """Have adapter `adapter` at store version `version` in memory under its own name."""
        self.load_adapter_as(adapter, adapter, version)

    def load_adapter_as(self, name: str, adapter: str, version: int, store: Store | None = None) -> None:
        """Have store version `version` of adapter `adapter` in memory under the name `name` (checksum
        verified), beside any other version: a server keeps e.g. 'medical@v1' for requests still in
        flight while new ones use 'medical@v2'. `store` (default self.store) is the manifest to read."""
        if self.adapters.get(name) == version:
            return
        store = store or self.store
        if store is None:
            raise StoreError(f"adapter {adapter} v{version} is not in memory and there is no store to read it from")
        meta = store.manifest["adapters"][adapter][str(version)]
        verify_files(store.root, meta["files"])
        if name in self.adapters:
            self.model.delete_adapter(name)
            del self.adapters[name]
        self.model = load_adapter(self.model, name, store.root / meta["path"])
        self.model.eval()
        self.adapters[name] = version

    def drop_adapter(self, adapter: str) -> None:
        if adapter in self.adapters:
            self.model.delete_adapter(adapter)
            del self.adapters[adapter]

    @contextmanager
    def using(self, domain: str | None, backbone: str = "pinned"):
        """Context: `domain`'s current adapter (None: no adapter) on the backbone version `backbone`
        says (pinned: the one it was trained with; latest: the newest). Yields the model."""
        store = self.store
        if domain is None:
            adapter, version = None, store.backbone_version(None) if store else self.backbone_loaded
        else:
            adapter = store.adapter_name(domain)
            self.ensure_adapter(adapter, store.adapter_meta(domain)["version"])
            version = store.backbone_version(domain, backbone)
        previous = self.backbone_loaded
        self.set_backbone(version)
        try:
            with active(self.model, adapter) if adapter or isinstance(self.model, PeftModel) else nullcontext():
                yield self.model
        finally:
            self.set_backbone(previous)

    @contextmanager
    def untouched(self):
        """Context: the untouched base model (no adapter, CRMA bypassed)."""
        with active(self.model, None) if isinstance(self.model, PeftModel) else nullcontext():
            with self.backbone.bypassed() if self.backbone is not None else nullcontext():
                yield self.model
