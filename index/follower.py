"""Keeps a replica's index in step with a shared PostgreSQL registry.

A thread with a connection of its own ``LISTEN``s for the registry's change
notifications and applies the change log as soon as one arrives (and every
``poll`` seconds anyway, so a missed notification only delays).  Between
changes it measures the lag: changes in the registry the index does not hold
yet.  When PostgreSQL cannot be reached it retries every second; the index
keeps what it has, so Verify never depends on it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import psycopg

from index.errors import RegistryUnavailable
from index.gallery import Gallery
from index.postgres_registry import CHANNEL, PostgresRegistry

log = logging.getLogger(__name__)


class Follower:
    """Follows ``gallery``'s PostgreSQL registry (see the module docstring).

    Attributes:
        lag: changes not yet applied, at the last measurement (-1: unknown).
        connected: whether the listening connection is up.
    """

    def __init__(self, gallery: Gallery, poll: float = 1.0) -> None:
        registry = gallery.registry
        if not isinstance(registry, PostgresRegistry):
            raise TypeError("only a PostgreSQL registry is followed")
        self.gallery = gallery
        self.registry = registry
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

    def _listen(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(f"LISTEN {CHANNEL}")
        if not self.connected:
            log.info("following the registry's change log")
        self.connected = True
        self._catch_up()  # whatever happened while not listening
        while not self._stop.is_set():
            for _ in conn.notifies(timeout=self.poll, stop_after=1):
                pass
            self._catch_up()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.registry.url, autocommit=True,
                                     connect_timeout=max(1, round(
                                         self.registry.connect_timeout))) as conn:
                    self._listen(conn)
            except (psycopg.Error, RegistryUnavailable) as exc:
                if self.connected:
                    log.warning("lost the registry's change log (%s); retrying",
                                type(exc).__name__)
                self.connected = False
                self.lag = -1
                self._stop.wait(1.0)
