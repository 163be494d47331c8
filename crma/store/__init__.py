"""The model store: the on-disk format for everything crma trains (runs, added domains), with every
adapter pinned to the backbone version it was trained with. See manifest.py for the layout.
This package only reads and writes files; work on a model is in crma.engine."""
from .manifest import MANIFEST, TEMP_PREFIX, StoreError, StoreLocked, check_name, sha256_texts, verify_files
from .store import BACKBONE_MODES, Store, Writer, creation_blockers, creation_settings, sweep_orphans

__all__ = ["BACKBONE_MODES", "MANIFEST", "TEMP_PREFIX", "Store", "StoreError", "StoreLocked", "Writer", "check_name",
           "creation_blockers", "creation_settings", "sha256_texts", "sweep_orphans", "verify_files"]
