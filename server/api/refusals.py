"""Refused calls, summarised so that a flood costs bounded log and audit volume.

A refusal (no valid identity, a role that does not allow the call, a rate
exceeded) is kept by its source address (the peer without its port: a client
that opens a new connection per call is still one source), identity, method
and reason.  The first few of each in an interval are written one by one; the
rest are only counted, and the count is written once at the end of the
interval (:meth:`Tally.take`).  Sources beyond :data:`MAX_KEYS` in one
interval (a flood from many addresses) are counted together as ``other``.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

Key = tuple[str, str, str, str]  # source, identity, method, reason
MAX_KEYS = 10_000


def source_of(peer: str) -> str:
    """A gRPC peer without its port: ``ipv4:10.0.0.7:53122`` -> ``ipv4:10.0.0.7``,
    ``ipv6:[::1]:53122`` -> ``ipv6:[::1]``; any other peer as it is."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return peer


@dataclass
class Tallied:
    count: int = 0
    since: str = ""  # when the first of the interval came (UTC, ISO 8601)
    presented: str = ""  # what the first that presented something presented


class Tally:
    """Refusals counted by :data:`Key` over intervals of ``interval`` seconds, the
    first ``per_key`` of each key in an interval let through one by one."""

    def __init__(self, per_key: int, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_key = per_key
        self.interval = interval
        self.clock = clock
        self._counts: dict[Key, Tallied] = {}
        self._start = clock()

    def note(self, key: Key, presented: str = "") -> bool:
        """Count one refusal: True while it is among the first ``per_key`` of its key
        in this interval (write it), False once it is only counted."""
        tallied = self._counts.get(key)
        if tallied is None and len(self._counts) >= MAX_KEYS:
            key = ("other", *key[1:])
            tallied = self._counts.get(key)
        if tallied is None:
            tallied = self._counts[key] = Tallied(
                since=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"))
        tallied.count += 1
        tallied.presented = tallied.presented or presented
        return tallied.count <= self.per_key

    def due(self) -> bool:
        return self.clock() - self._start >= self.interval

    def take(self) -> list[tuple[Key, Tallied]]:
        """The keys that went over their allowance in this interval, with their whole
        counts; a new interval begins."""
        over = [(k, t) for k, t in self._counts.items() if t.count > self.per_key]
        self._counts.clear()
        self._start = self.clock()
        return over
