"""Keeps a replica's index in step with a shared registry.

A thread with a listener of its own (:meth:`index.registry.Registry.listen`,
PostgreSQL's ``LISTEN``) waits for the registry's change notices and applies
the change log as soon as one arrives (and every ``poll`` seconds anyway, so a
missed notice only delays).  Between changes it measures the lag: changes in
the registry the index does not hold yet.  When the registry cannot be
reached it retries every second; the index keeps what it has, so Verify never
depends on it.
"""

from __future__ import annotations

import logging
import threading

from index.errors import RegistryUnavailable
from index.gallery import Gallery
from index.registry import ChangeListener

log = logging.getLogger(__name__)


class Follower:
    """Follows ``gallery``'s shared registry (see the module docstring).

    Attributes:
        lag: changes not yet applied, at the last measurement (-1: unknown).
        connected: whether the listening connection is up.
    """

    def __init__(self, gallery: Gallery, poll: float = 1.0) -> None:
        if not gallery.registry.distributed:
            raise TypeError("only a shared registry is followed")
        self.gallery = gallery
        self.registry = gallery.registry
        self.poll = poll
        self.lag = 0
        self.connected = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-follower", daemon=True)

    def start(self) -> Follower:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _catch_up(self) -> None:
        self.gallery.refresh()
        self.lag = self.gallery.lag()
        self.gallery.snapshot_if_due()

    def _follow(self, listener: ChangeListener) -> None:
        if not self.connected:
            log.info("following the registry's change log")
        self.connected = True
        self._catch_up()  # whatever happened while not listening
        while not self._stop.is_set():
            listener.wait(self.poll)
            self._catch_up()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                listener = self.registry.listen()
                if listener is None:
                    raise TypeError("this registry sends no change notices")
                try:
                    self._follow(listener)
                finally:
                    listener.close()
            except Exception as exc:  # the thread must live: the index must keep up
                if isinstance(exc, RegistryUnavailable):
                    if self.connected:
                        log.warning("lost the registry's change log (%s); retrying", exc)
                else:
                    log.exception("following the registry's change log failed; retrying")
                self.connected = False
                self.lag = -1
                self._stop.wait(1.0)
