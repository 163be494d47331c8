"""The shared CRMA backbone: one CRMABlock on every decoder block's output, attached by forward hooks.

The blocks live in `model.crma_backbone` (so distributed wrappers see and sync them) and the hooks
rewrite each decoder block's output h into h + alpha W M R h. Module names of the base model are
untouched, so PEFT adapters trained on top stay loadable onto the plain base model.
Saved as safetensors (parameters named crma_*) with the config and the base model's fingerprint.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import CRMAConfig
from ..io import atomic_path
from .layer import CRMABlock, folded_operators
from .models import decoder_layers, family, fingerprint, mlp_out_weight

BACKBONE_FILE = "crma_backbone.safetensors"


class FingerprintError(ValueError):
    """A saved backbone that belongs to a different base model."""


class VersionStack:
    """Several backbone versions' operators, stacked per block (serving: one batch, many versions).

    `keys[i]` names the i-th stacked version; `blocks[layer]` is ((M R)^T (V, d, n), (alpha W)^T (V, n, d)),
    each version's folded_operators, computed once per set of versions (no Sinkhorn or QR per step)."""

    def __init__(self, keys: list, blocks: list[tuple[torch.Tensor, ...]]):
        self.keys = list(keys)
        self.blocks = blocks
        self._pos = {k: i for i, k in enumerate(self.keys)}
        self._gathered_key, self._gathered = None, []

    def rows(self, keys: list) -> torch.Tensor:
        """Row -> stack position index (b,) for the version key of every batch row."""
        device = self.blocks[0][0].device if self.blocks else None
        return torch.tensor([self._pos[k] for k in keys], dtype=torch.long, device=device)

    def gather(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Per block, the operators of each row's version (b, ...); the last gather is kept, since
        consecutive decoding steps usually have the same rows."""
        key = tuple(rows.tolist())
        if key != self._gathered_key:
            self._gathered = [tuple(t.index_select(0, rows) for t in ops) for ops in self.blocks]
            self._gathered_key = key
        return self._gathered


class CRMABackbone(nn.Module):
    def __init__(self, cfg: CRMAConfig, d: int, num_layers: int, base_fingerprint: dict,
                 bases: list[torch.Tensor | None] | None = None, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.base_fingerprint = base_fingerprint
        gen = torch.Generator().manual_seed(seed)
        bases = bases or [None] * num_layers
        self.crma_blocks = nn.ModuleList(CRMABlock(d, cfg, basis, gen) for basis in bases)
        self._hooks: list = []
        self.enabled = True

    @classmethod
    def for_model(cls, model: nn.Module, cfg: CRMAConfig, seed: int = 0) -> CRMABackbone:
        """A fresh backbone sized for `model`; read/write start from each block's top singular
        directions of its MLP output weight (PiSSA-style) or from a seeded random basis."""
        layers = decoder_layers(model)
        d = model.config.hidden_size
        bases = None
        if cfg.read_init == "pissa":
            bases = []
            for block in layers:
                weight = mlp_out_weight(block, family(model), d)                 # (d, k) or None
                bases.append(None if weight is None else torch.linalg.svd(weight, full_matrices=False)[0])
        return cls(cfg, d, len(layers), fingerprint(model), bases, seed)

    # ---- attaching --------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> CRMABackbone:
        """Hook every decoder block of `model` and register self as `model.crma_backbone`."""
        layers = decoder_layers(model)
        if len(layers) != len(self.crma_blocks):
            raise FingerprintError(f"backbone has {len(self.crma_blocks)} blocks, model has {len(layers)}")
        if getattr(model, "crma_backbone", None) is not None:
            raise ValueError("model already has a CRMA backbone attached")
        model.add_module("crma_backbone", self)
        param = next(model.parameters())
        self.to(param.device)
        for layer, block in zip(layers, self.crma_blocks, strict=False):
            self._hooks.append(layer.register_forward_hook(_make_hook(self, block)))
        return self

    @contextmanager
    def bypassed(self):
        """Context: the hooked model computes exactly the base model (CRMA switched off)."""
        self.enabled, previous = False, self.enabled
        try:
            yield self
        finally:
            self.enabled = previous

    # ---- parameters and diagnostics ---------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Optimizer groups with separate learning rates: mixing logits, gate, read/write."""
        groups = {"crma_theta": [], "crma_gate": [], "crma_rw": []}
        for name, p in self.named_parameters():
            key = name.rsplit(".", 1)[-1]
            groups["crma_rw" if key in ("crma_read", "crma_write") else key].append(p)
        lrs = {"crma_theta": self.cfg.lr_theta, "crma_gate": self.cfg.lr_gate, "crma_rw": self.cfg.lr_rw}
        return [{"params": ps, "lr": lrs[k], "name": k, "weight_decay": 0.0} for k, ps in groups.items()]

    # ---- serving: one parameter set per batch row (additive; the single-version path is unchanged) ----
    @torch.no_grad()
    def stack_versions(self, states: dict) -> VersionStack:
        """Stack the operators of several saved states ({key: state_dict as from load_version}) of this
        backbone, for per_row. Computed once per set of versions, not on every forward."""
        keys = list(states)
        device = next(self.parameters()).device
        blocks = []
        for i, block in enumerate(self.crma_blocks):
            ops = [folded_operators(*(states[k][f"crma_blocks.{i}.crma_{p}"].to(device).float()
                                   for p in ("read", "theta", "write", "gate")), block.cfg) for k in keys]
            blocks.append(tuple(torch.stack([o[j] for o in ops]).contiguous() for j in range(2)))
        return VersionStack(keys, blocks)

    @contextmanager
    def per_row(self, stack: VersionStack, rows: torch.Tensor):
        """Context: batch row b of the hooked model uses version stack.keys[rows[b]] of the backbone
        (per-row gather of the stacked operators); `bypassed` still switches CRMA off entirely."""
        for block, ops in zip(self.crma_blocks, stack.gather(rows), strict=False):
            block.row_operators = ops
        try:
            yield self
        finally:
            for block in self.crma_blocks:
                block.row_operators = None

    def stats(self) -> list[dict[str, float]]:
        """Per-layer spectral diagnostics: norm, norm_dev, row_dev, col_dev, alpha."""
        return [block.stats() for block in self.crma_blocks]

    # ---- persistence ------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write DIR/crma_backbone.safetensors atomically, with config and fingerprint metadata."""
        path = Path(directory) / BACKBONE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"crma_config": json.dumps(asdict(self.cfg)),
                "base_fingerprint": json.dumps(self.base_fingerprint, sort_keys=True),
                "format": "crma-backbone-v1"}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module) -> CRMABackbone:
        """Load a saved backbone for `model`; fails clearly if it was trained on another base model."""
        path = Path(directory)
        path = path / BACKBONE_FILE if path.is_dir() else path
        cfg, state = read_backbone_file(path, fingerprint(model))
        backbone = cls(cfg, model.config.hidden_size, model.config.num_hidden_layers, fingerprint(model))
        backbone.load_state_dict(state)
        return backbone

    def load_version(self, path: str | Path) -> dict[str, torch.Tensor]:
        """The state of another saved version of this backbone (same base model and settings)."""
        cfg, state = read_backbone_file(Path(path), self.base_fingerprint)
        if cfg != self.cfg:
            raise FingerprintError(f"{path}: backbone settings {asdict(cfg)} differ from {asdict(self.cfg)}")
        return state


def read_backbone_file(path: Path, expected_fingerprint: dict) -> tuple[CRMAConfig, dict[str, torch.Tensor]]:
    """(config, state) of a crma_backbone.safetensors file, checked against the base model's fingerprint."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no saved CRMA backbone here")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "crma-backbone-v1":
        raise ValueError(f"{path}: not a crma backbone file (metadata format={meta.get('format')!r})")
    saved_fp = json.loads(meta["base_fingerprint"])
    if saved_fp != expected_fingerprint:
        diff = {k: (saved_fp.get(k), expected_fingerprint.get(k)) for k in saved_fp
                if saved_fp.get(k) != expected_fingerprint.get(k)}
        raise FingerprintError(f"{path}: backbone was trained on a different base model; "
                               f"mismatch (saved, this model): {diff}")
    return CRMAConfig(**json.loads(meta["crma_config"])), load_file(str(path))


def _make_hook(backbone: CRMABackbone, block: CRMABlock):
    def hook(module, args, output):
        if not backbone.enabled:
            return output
        if isinstance(output, tuple):        # some blocks return (hidden_states, ...)
            return (block(output[0]),) + output[1:]
        return block(output)
    return hook
