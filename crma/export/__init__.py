"""`crma export`: a model store as files another serving engine runs (vLLM), with the same models.

    lora.py         the backbone-as-LoRA rewrite: adapter + backbone version -> one PEFT LoRA
    wrap.py         the base model with a zero-weight `crma_out` linear after each block (what that LoRA targets)
    launch.py       the `vllm serve` command (export.json) and launch.sh
    vllm.py         the export itself: base folder, LoRA folders, re-export writing only what changed
"""
from .lora import CRMA_MODULE, ExportError
from .vllm import ExportConfig, export_store

__all__ = ["CRMA_MODULE", "ExportConfig", "ExportError", "export_store"]
