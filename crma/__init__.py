"""crma: continual fine-tuning of causal LMs with a spectrally bounded CRMA backbone and per-domain LoRA."""
__version__ = "0.1.0"


def __getattr__(name):          # `crma.Store` without importing torch at `import crma`
    if name == "Store":
        from .store import Store
        return Store
    raise AttributeError(f"module 'crma' has no attribute {name!r}")
