"""`crma export --to vllm`: a model store as files vLLM serves, written again only where they changed.

    OUT/
      base/                 the base model as a plain Hugging Face folder (safetensors) + tokenizer
      loras/<folder>/       one PEFT LoRA per served adapter version (modular: + its backbone version)
      export.json           what was exported from which manifest, the source checksums, the vllm command
      launch.sh             that command (crma/export/launch.py)

Folder names: `<adapter>-v<k>` (frozen, naive: the store's folder, copied), `<adapter>-v<k>-bb<j>` (modular:
adapter v<k> on backbone v<j>, crma/export/lora.py), `base-bb<j>` (modular: no domain adapter, backbone v<j>,
what crma serves as `base`), `base-zero` (frozen, naive: a LoRA that changes nothing, so `base` is a LoRA too;
lora.zero_lora says why). The plain base model is vLLM's `--served-model-name` (default `plain`).
Every folder records the sha256 of the store files it was made from; a later export keeps a folder whose
sources and own files are unchanged and writes the rest (temp folder, then rename).
Folders no longer served are left in place (a running vLLM may still use them) and listed as `stale`.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ..config import opt
from ..io import atomic_dir, write_json, write_text
from ..method.backbone import BACKBONE_FILE, read_backbone_file
from ..method.models import fingerprint, load_model
from ..store import BACKBONE_MODES, Store, StoreError, verify_files
from ..store.paths import file_hashes, now, sha256_file
from ..version import __version__
from .launch import PLUGIN_ARCHITECTURES, launch_script, serve_command
from .lora import ExportError, backbone_factors, combine, zero_lora
from .wrap import layers_path

FORMAT = "crma-vllm-export-v1"
REWRITE = "crma-backbone-as-lora-v1"           # bump when the rewrite changes: every modular folder is rewritten
TARGETS = ("vllm",)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class ExportConfig:
    store: Path = opt(help="the model store folder")
    out: Path = opt(help="the export folder (created; a later export into it writes only what changed)")
    to: str = opt("vllm", choices=TARGETS, help="the serving engine to export for")
    backbone: str = opt("pinned", choices=BACKBONE_MODES,
                        help="modular stores: each adapter on the backbone version it was trained with (pinned) "
                             "or on the newest (latest)")
    max_loras: int = opt(0, help="vllm --max-loras, LoRAs in one batch (0: every exported domain)")
    dtype: str = opt("auto", help="vllm --dtype (auto: vLLM's choice from the exported config)")
    served_name: str = opt("", help="vllm --served-model-name of the plain base model (default: plain; `base` is "
                                    "a LoRA: the newest backbone alone, or a zero LoRA without a backbone)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_previous(out: Path) -> dict:
    """The previous export.json of `out` ({} for a new or empty folder); ExportError for a folder that holds
    something else, or another store's export."""
    if not out.exists():
        return {}
    if not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    path = out / "export.json"
    if not path.is_file():
        if any(out.iterdir()):
            raise ExportError(f"{out}: a non-empty folder that is not a crma export (no export.json); "
                              "choose a new or empty folder")
        return {}
    try:
        prev = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: unreadable ({err}); remove it or export into a new folder") from err
    if prev.get("format") != FORMAT:
        raise ExportError(f"{path}: not a {FORMAT} file")
    return prev


def _unchanged(out: Path, entry: dict | None, sources: dict) -> bool:
    """A folder of the previous export whose sources are these and whose files are as it wrote them."""
    if not entry or entry.get("sources") != sources:
        return False
    return all((out / rel).is_file() and sha256_file(out / rel) == sha for rel, sha in entry["files"].items())


class Exporter:
    """One export: decides what each folder is made from, writes what changed, records everything."""

    def __init__(self, cfg: ExportConfig):
        if cfg.to not in TARGETS:
            raise ExportError(f"--to {cfg.to!r}: crma exports for {', '.join(TARGETS)}")
        if cfg.backbone not in BACKBONE_MODES:
            raise ExportError(f"--backbone {cfg.backbone!r}: choose pinned or latest")
        if cfg.max_loras < 0:
            raise ExportError(f"--max-loras {cfg.max_loras}: must be >= 0")
        self.cfg = cfg
        self.store = Store(cfg.store)
        self.out = Path(cfg.out)
        if self.out.resolve() == self.store.root.resolve() or self.store.root.resolve() in self.out.resolve().parents:
            raise ExportError(f"{self.out}: the export cannot go inside the store")
        self.prev = _read_previous(self.out)
        if self.prev and Path(self.prev["store"]) != self.store.root.resolve():
            raise ExportError(f"{self.out}: holds the export of another store ({self.prev['store']}); "
                              "choose a new or empty folder")
        self.modular = self.store.condition == "modular"
        arch = self.store.fingerprint.get("architecture")
        if self.modular and arch not in PLUGIN_ARCHITECTURES:
            raise ExportError(f"a modular store on {arch} cannot be served by vLLM: the crma plugin wraps "
                              f"{', '.join(PLUGIN_ARCHITECTURES)} (a frozen store of any vLLM model can be exported)")
        self.base_name = cfg.served_name or "plain"
        if self.base_name in {*self.store.domains(), "base"}:
            raise ExportError(f"--served-name {self.base_name!r} is also the name of an exported LoRA module")
        self.written: list[str] = []
        self.kept: list[str] = []
        self._model = None

    # ---- the base model -------------------------------------------------------------------------------
    def _base_model(self):
        """The store's base model, loaded once (fp32), fingerprint checked against the manifest."""
        if self._model is None:
            seed = self.store.manifest["settings"].get("seed", 0)
            model, tokenizer = load_model(self.store.model_spec, seed=seed)
            if fingerprint(model) != self.store.fingerprint:
                raise StoreError(f"{self.store.root}: built on base model {self.store.fingerprint}, but "
                                 f"{self.store.model_spec!r} loads as {fingerprint(model)}")
            self._model = (model, tokenizer)
        return self._model

    def export_base(self) -> dict:
        """OUT/base: the base model's weights copied into a plain model of the same config (a GGUF-loaded
        model cannot be saved as it is), saved as safetensors, with its tokenizer."""
        sources = {"model": self.store.model_spec, "fingerprint": self.store.fingerprint}
        entry = self.prev.get("base")
        if _unchanged(self.out, entry, sources):
            self.kept.append("base")
            return entry
        model, tokenizer = self._base_model()
        config = model.config
        for attr in ("crma_model_spec", "quantization_config"):
            if hasattr(config, attr):
                delattr(config, attr)
        plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
        plain.load_state_dict(model.state_dict())                  # de-quantised (GGUF) weights into plain tensors
        config.crma_model_spec = self.store.model_spec
        with atomic_dir(self.out / "base") as tmp:
            plain.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            for f in tmp.iterdir():                    # transformers writes some files 0600: readable like the rest
                f.chmod(0o666 & ~_umask())
        self.written.append("base")
        return {"path": "base", "architecture": type(model).__name__, "layers_path": layers_path(model),
                "sources": sources, "files": file_hashes(self.out / "base", self.out)}

    # ---- LoRA folders ---------------------------------------------------------------------------------
    def lora_folder(self, name: str, sources: dict, write) -> dict:
        """OUT/loras/<name>, kept when its sources are unchanged, else written by write(tmp_folder)."""
        entry = self.prev.get("loras", {}).get(name)
        if _unchanged(self.out, entry, sources):
            self.kept.append(f"loras/{name}")
            return entry
        with atomic_dir(self.out / "loras" / name) as tmp:
            write(tmp)
        self.written.append(f"loras/{name}")
        return {"path": f"loras/{name}", "sources": sources, "files": file_hashes(self.out / "loras" / name, self.out)}

    def _backbone(self, version: int):
        meta = self.store.backbone_meta(version)
        verify_files(self.store.root, meta["files"])
        return meta, read_backbone_file(self.store.root / meta["path"] / BACKBONE_FILE, self.store.fingerprint)

    def export_lora(self, adapter: str, version: int | None, bb: int | None, base: dict) -> tuple[str, dict]:
        """(folder name, entry) of one adapter version (None: no adapter) on backbone version `bb` (None:
        frozen/naive, the store's folder copied)."""
        meta = self.store.manifest["adapters"][adapter][str(version)] if version is not None else None
        if meta is not None:
            verify_files(self.store.root, meta["files"])
        if bb is None:
            name = f"{adapter}-v{version}"

            def copy(tmp: Path) -> None:
                for f in ADAPTER_FILES:
                    shutil.copy2(self.store.root / meta["path"] / f, tmp / f)
            return name, self.lora_folder(name, {"adapter": meta["files"]}, copy)
        bb_meta, (cfg, state) = self._backbone(bb)
        name = f"{adapter}-v{version}-bb{bb}" if meta is not None else f"base-bb{bb}"
        sources = {"rewrite": REWRITE, "backbone": bb_meta["files"], "adapter": meta["files"] if meta else None}

        def rewrite(tmp: Path) -> None:
            adapter_state = config = None
            if meta is not None:
                folder = self.store.root / meta["path"]
                adapter_state = load_file(str(folder / "adapter_model.safetensors"))
                config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
            tensors, new_config = combine(adapter_state, config, backbone_factors(state, cfg), base["layers_path"])
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            (tmp / "adapter_config.json").write_text(json.dumps(new_config, indent=2) + "\n", encoding="utf-8")
        return name, self.lora_folder(name, sources, rewrite)

    # ---- the whole export -----------------------------------------------------------------------------
    def run(self) -> dict:
        store, cfg = self.store, self.cfg
        if not store.domains():
            raise ExportError(f"{store.root}: no domains to export")
        base = self.export_base()
        loras: dict[str, dict] = {}
        served: dict[str, dict] = {}
        for domain in store.domains():
            meta = store.adapter_meta(domain)
            adapter = store.adapter_name(domain)
            bb = store.backbone_version(domain, cfg.backbone) if self.modular else None
            name, entry = self.export_lora(adapter, meta["version"], bb, base)
            loras[name] = entry
            served[domain] = {"lora": name, "adapter": adapter, "version": meta["version"], "backbone_version": bb}
        if self.modular:                          # crma serves `base` on the newest backbone: a LoRA of its own
            bb = store.backbone_version(None)
            name, loras[name] = self.export_lora("base", None, bb, base)
        else:                                     # the base model as a LoRA that changes nothing (zero_lora says why)
            bb, first = None, served[store.domains()[0]]
            name, loras[name] = self.export_zero(first["adapter"], first["version"])
        served["base"] = {"lora": name, "adapter": None, "version": None, "backbone_version": bb}
        return self.finish(base, loras, served)

    def export_zero(self, adapter: str, version: int) -> tuple[str, dict]:
        """(folder name, entry) of `base` in a store without a backbone: zero_lora of adapter v<version>."""
        meta = self.store.manifest["adapters"][adapter][str(version)]
        folder = self.store.root / meta["path"]

        def write(tmp: Path) -> None:
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
            tensors, new_config = zero_lora(load_file(str(folder / "adapter_model.safetensors")), config)
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            (tmp / "adapter_config.json").write_text(json.dumps(new_config, indent=2) + "\n", encoding="utf-8")
        return "base-zero", self.lora_folder("base-zero", {"zero_of": meta["files"]}, write)

    def finish(self, base: dict, loras: dict, served: dict) -> dict:
        cfg, out = self.cfg, self.out.resolve()
        ranks = []
        for entry in loras.values():
            ranks.append(json.loads((self.out / entry["path"] / "adapter_config.json").read_text())["r"])
        base_name = self.base_name
        modules = {model: str(out / loras[s["lora"]]["path"]) for model, s in served.items()}
        arch = PLUGIN_ARCHITECTURES[base["architecture"]] if self.modular else None
        argv = serve_command(str(out / "base"), base_name, modules, max(ranks), cfg.max_loras or len(modules), arch,
                             cfg.dtype)
        new = [s["lora"] for s in served.values() if f"loras/{s['lora']}" in self.written]
        manifest = self.store.manifest
        record = {
            "format": FORMAT, "crma_version": __version__, "exported": now(), "store": str(self.store.root.resolve()),
            "manifest": {"updated": manifest.get("updated"), "created": manifest.get("created"),
                         "log_entries": len(manifest["log"]),
                         "sha256": sha256_file(self.store.root / "manifest.json")},
            "condition": self.store.condition, "model": self.store.model_spec, "backbone": cfg.backbone,
            "base_model_name": base_name, "plugin_architecture": arch,
            "models": served, "base": base, "loras": loras, "command": argv,
            "written": self.written, "kept": self.kept,
            "stale": sorted(p.name for p in (self.out / "loras").iterdir() if p.name not in loras)
            if (self.out / "loras").is_dir() else [],
            "hot_add": [{"lora_name": m, "lora_path": modules[m]} for m, s in served.items() if s["lora"] in new],
        }
        made_from = (f"crma export --to vllm of {record['store']} (manifest updated {record['manifest']['updated']}, "
                     f"{record['manifest']['log_entries']} log entries), {record['exported']}")
        write_text(self.out / "launch.sh", launch_script(argv, str(out), made_from))
        (self.out / "launch.sh").chmod(0o755)
        write_json(self.out / "export.json", record)
        return record


def export_store(cfg: ExportConfig) -> dict:
    """Export the store cfg.store into cfg.out; returns what export.json records."""
    return Exporter(cfg).run()
