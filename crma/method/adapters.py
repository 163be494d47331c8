"""Per-domain PEFT LoRA adapters: create, activate, isolate, save in standard PEFT format.

Each domain gets a fresh adapter named after it (the `naive` condition shares one named `shared`).
Only the adapter being trained (and, in `modular`, the CRMA backbone) has gradients: activating an
adapter never turns its gradients on; `set_trainable` is the one place that does, after activation.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..config import LoraSettings
from .models import family, lora_targets

SHARED = "shared"   # adapter name of the naive condition


def lora_config(model: nn.Module, settings: LoraSettings) -> LoraConfig:
    """PEFT LoraConfig for this model's family (GPT-2's Conv1D layers need fan_in_fan_out)."""
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.targets or lora_targets(model)),
                      fan_in_fan_out=family(model) == "gpt2", task_type="CAUSAL_LM", bias="none")


def add_adapter(model: nn.Module, name: str, settings: LoraSettings) -> PeftModel:
    """Add a fresh LoRA adapter `name` (wrapping the model in a PeftModel the first time)."""
    if isinstance(model, PeftModel):
        if name in model.peft_config:
            raise ValueError(f"adapter {name!r} already exists")
        model.add_adapter(name, lora_config(model.get_base_model(), settings))
        return model
    return get_peft_model(model, lora_config(model, settings), adapter_name=name)


def set_trainable(model: nn.Module, adapter: str | None, backbone: bool) -> list[nn.Parameter]:
    """Gradients only for adapter `adapter`'s LoRA weights and, if `backbone`, the crma_ parameters.

    Returns the LoRA parameters that train (the backbone's come from CRMABackbone.param_groups)."""
    lora = []
    for name, p in model.named_parameters():
        is_lora = adapter is not None and adapter_of(name) == adapter
        p.requires_grad_(is_lora or (backbone and "crma_" in name))
        if is_lora:
            lora.append(p)
    return lora


def adapter_of(param_name: str) -> str | None:
    """The adapter a LoRA parameter belongs to: the key right after `lora_A`/`lora_B`/... in its
    dotted name (`...q_proj.lora_A.medical.weight` -> 'medical'), matched whole, so a domain named
    `model`, `layers` or `q_proj` cannot capture other adapters' weights. None if not a LoRA weight."""
    parts = param_name.split(".")
    for k in range(len(parts) - 1):
        if parts[k].startswith("lora_"):
            return parts[k + 1]
    return None


def active(model: nn.Module, adapter: str | None):
    """Context: run with LoRA adapter `adapter`, or with no adapter at all when None."""
    if not isinstance(model, PeftModel):
        if adapter is not None:
            raise ValueError(f"model has no adapters, cannot activate {adapter!r}")
        return nullcontext()
    if adapter is None:
        return model.disable_adapter()
    return _using(model, adapter)


@contextmanager
def _using(model: PeftModel, adapter: str):
    if adapter not in model.peft_config:
        raise ValueError(f"unknown adapter {adapter!r}; have {sorted(model.peft_config)}")
    previous = model.active_adapter
    model.set_adapter(adapter, inference_mode=True)      # activating never turns gradients on
    try:
        yield model
    finally:
        model.set_adapter(previous, inference_mode=True)


def save_adapter(model: PeftModel, adapter: str, folder: str | Path) -> Path:
    """Write one adapter's adapter_config.json + adapter_model.safetensors into `folder` (standard PEFT
    format: `PeftModel.from_pretrained(base, folder)` loads it). The model store makes it atomic."""
    folder = Path(folder)
    model.save_pretrained(str(folder), selected_adapters=[adapter],
                          save_embedding_layers=False)   # LoRA on linears only; embeddings never change
    nested = folder / adapter    # PEFT nests non-"default" adapters in a sub-folder
    if nested.is_dir():
        for f in nested.iterdir():
            f.rename(folder / f.name)
        nested.rmdir()
    (folder / "README.md").unlink(missing_ok=True)   # PEFT's model-card stub says nothing about crma
    return folder


def load_adapter(model: nn.Module, adapter: str, directory: str | Path) -> PeftModel:
    """Load a saved adapter folder under the name `adapter`."""
    path = Path(directory)
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{path}: no adapter_config.json, not a PEFT adapter folder")
    if isinstance(model, PeftModel):
        model.load_adapter(str(path), adapter_name=adapter)
        return model
    return PeftModel.from_pretrained(model, str(path), adapter_name=adapter)
