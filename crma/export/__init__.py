"""`crma export`: a model store as files another serving engine runs (vLLM), with the same models.

    lora.py         the backbone-as-LoRA rewrite: adapter + backbone version -> one PEFT LoRA; the crma_out rule
    wrap.py         the base model with a zero-weight `crma_out` linear after each block (what that LoRA targets)
    launch.py       the `vllm serve` command (export.json) and launch.sh
    vllm.py         the export itself: base folder, LoRA folders, re-export writing only what changed
    vllm_plugin.py  the vLLM model plugin for modular stores (imported by vLLM only, in vLLM's environment)

This file imports nothing: vLLM imports the plugin in an environment that has vLLM's own transformers and
not all of crma's dependencies, so importing `crma.export.vllm_plugin` must not pull in the exporter.
"""
