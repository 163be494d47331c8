"""crma: continual fine-tuning of causal LMs with a spectrally bounded CRMA backbone and per-domain LoRA."""
__version__ = "0.1.0"
