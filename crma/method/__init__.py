"""The method: Sinkhorn, the CRMA block and backbone, per-domain LoRA adapters, base models."""
