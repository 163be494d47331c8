"""The model store: one on-disk format for everything crma trains (runs, added domains), with every
adapter pinned to the backbone version it was trained with. See manifest.py for the layout."""
from .manifest import StoreError, StoreLocked, check_name
from .store import Store


def open_store(root) -> Store:
    """The store at `root` (read-only view; `.router()`, `.base()`, `.generate()`, `.live()`)."""
    return Store(root)


__all__ = ["Store", "StoreError", "StoreLocked", "check_name", "open_store"]
