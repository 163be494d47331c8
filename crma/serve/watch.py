"""`crma serve --watch`: pick up a new store manifest without being told.

A thread looks at STORE/manifest.json every `interval` seconds (size, mtime, inode: writers replace
it by rename) and reloads when it changed. A manifest that fails verification is refused once and
not retried until the manifest changes again; the server keeps serving the previous one meanwhile.
"""
from __future__ import annotations

import logging
import os
import threading

from ..store import MANIFEST, StoreError

log = logging.getLogger("crma.serve")


class ManifestWatcher:
    def __init__(self, server, interval: float = 1.0):
        self.server, self.interval = server, interval
        self.path = server.cfg.store / MANIFEST
        self.seen = self._signature()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="crma-watch", daemon=True)

    def _signature(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def start(self) -> ManifestWatcher:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            sig = self._signature()
            if sig is None or sig == self.seen:
                continue
            self.seen = sig
            try:
                self.server.reload()
            except StoreError as err:
                log.error("watch: new manifest refused: %s", err)
            except Exception:                       # keep watching whatever happens
                log.exception("watch: reload failed")
