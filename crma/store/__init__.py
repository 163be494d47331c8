"""The model store: the on-disk format for everything crma trains (runs, added domains), with every
adapter pinned to the backbone version it was trained with. See manifest.py for the layout.
This package only reads and writes files; work on a model is in crma.engine."""
from .lock import StoreLocked
from .manifest import check_name, creation_settings
from .paths import MANIFEST, TEMP_PREFIX, StoreError, sha256_texts, verify_files
from .store import BACKBONE_MODES, Store, Writer
from .sweep import creation_blockers, sweep_orphans

__all__ = ["BACKBONE_MODES", "MANIFEST", "TEMP_PREFIX", "Store", "StoreError", "StoreLocked", "Writer", "check_name",
           "creation_blockers", "creation_settings", "sha256_texts", "sweep_orphans", "verify_files"]
