"""Who may call what: client identities, roles, and per-identity rate limits.

A client is identified by its TLS certificate's common name (mutual TLS) or by
an API key sent as ``authorization: Bearer <key>`` (or ``x-api-key``) metadata;
the policy stores only each key's SHA-256.  The policy file maps identities to
roles and roles to RPCs::

    {
      "clients": [
        {"name": "kyc-backend", "certificate_cn": "kyc-backend.prakerja.internal",
         "roles": ["verifier", "registrar"], "rate_per_second": 200, "burst": 400},
        {"name": "review-desk", "api_key_sha256": "9f86d0...", "roles": ["reviewer"]}
      ],
      "roles": {"auditor": ["GetEnrollment", "GetServerInfo"]}
    }

``roles`` adds roles to the built-in :data:`ROLES` (it may not redefine one).
A client entry with ``"certificate_cn": "*"`` matches every certificate the
client CA signed that no entry names; ``"revoked": [{"certificate_cn": ...},
{"api_key_sha256": ...}]`` refuses those identities whatever else matches.
The health service is open to every caller (load balancers and probes).

The file fails closed: it is read strictly (an unknown field, a duplicated JSON
key, two entries for one certificate or key, a redefined built-in role are
refused), and refused when others could change it
(:func:`index.durable.check_control`).  It is read again when it changes; a
change that is refused is logged and counted, and the previous policy stays.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from index.durable import check_control, replace_atomically
from server import strict
from server.api.rpcs import ADMIN, RPCS, SEES_CANDIDATES, builtin_roles
from server.errors import ConfigurationError, PermissionDenied, RateLimited, Unauthenticated

log = logging.getLogger(__name__)

# The built-in roles, from the table of RPCs (:data:`server.api.rpcs.RPCS`).
ROLES: dict[str, frozenset[str]] = builtin_roles()
API_KEY_PREFIX = "fv_"
RATE_FILE = "ratelimits.sqlite3"  # in the data directory: see SharedBuckets
# Without an access policy (insecure mode): one identity with every role.
ANONYMOUS = "anonymous"


def new_api_key() -> tuple[str, str]:
    """A fresh API key and the SHA-256 (hex) to put in the policy."""
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key)


def hash_key(key: str) -> str:
    # Keys are 256 random bits: a plain hash cannot be reversed by guessing,
    # so no salt or slow hash is needed (unlike passwords).
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class TokenBucket:
    """``rate`` calls per second on average, bursts of up to ``burst``."""

    rate: float
    burst: float
    tokens: float = 0.0
    updated: float = 0.0

    def _refill(self, now: float) -> None:
        if self.updated == 0.0:
            self.tokens, self.updated = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def charge(self, n: float, now: float) -> None:
        """Count ``n`` more calls made now, going into debt if need be (the calls
        that follow wait until it is paid)."""
        self._refill(now)
        self.tokens -= n

    def take(self, now: float) -> float:
        """0 if a call may go ahead now (and count it), else seconds until one may."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class LocalBuckets:
    """The token buckets of one process, by client name."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def take(self, name: str, rate: float, burst: float, calls: float = 1.0,
             debt: bool = False) -> float:
        """0 if ``calls`` may go ahead now (counted), else seconds to wait; with
        ``debt`` they are counted whatever the balance (see :meth:`TokenBucket.charge`)."""
        with self._lock:
            bucket = self._buckets.get(name)
            if bucket is None or (bucket.rate, bucket.burst) != (rate, burst):
                bucket = self._buckets[name] = TokenBucket(rate, burst)
            if debt:
                bucket.charge(calls, self.clock())
                return 0.0
            return bucket.take(self.clock())

    async def take_async(self, name: str, rate: float, burst: float, calls: float = 1.0,
                         debt: bool = False) -> float:
        """:meth:`take` (in memory: no wait)."""
        return self.take(name, rate, burst, calls, debt)


STORE_WAIT = 0.25  # seconds a call waits for the shared rate store before its fallback
STORE_RETRY = 1.0  # seconds the fallback is used before the store is tried again


class SharedBuckets:
    """Token buckets shared by every process of a server on this machine (a SQLite
    file in the data directory, one immediate transaction a call), so that
    ``--processes N`` does not multiply a client's rate by N.  Across machines
    each server has its own: see docs/scaling.md for where a global limiter goes.

    Calls reach the file from a thread of their own, never the event loop
    (:meth:`take_async`), and wait for it at most ``wait`` seconds.  Where it is
    unavailable (another process holds it locked longer, or it fails), each
    process limits from its own buckets instead (so a client gets at most its rate
    times the processes) for :data:`STORE_RETRY` seconds before trying the file
    again: logged once an outage and counted (``on_fallback``), never an error
    for the caller."""

    def __init__(self, path: Path, clock: Any = time.time, wait: float = STORE_WAIT,
                 on_fallback: Callable[[], None] = lambda: None) -> None:
        self.clock = clock
        self.wait = wait
        self.on_fallback = on_fallback
        self.fallback = LocalBuckets()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rate-store")
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                   timeout=wait)
        os.chmod(path, 0o600)
        # Processes starting together race to switch the new file to WAL, and SQLite
        # answers that race "database is locked" at once, without its busy wait.
        deadline = time.monotonic() + max(wait, 1.0)
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self._db.execute("PRAGMA synchronous=OFF")  # a lost update costs a few tokens
        self._db.execute("CREATE TABLE IF NOT EXISTS buckets (name TEXT PRIMARY KEY, "
                         "rate REAL, burst REAL, tokens REAL, updated REAL)")

    def take(self, name: str, rate: float, burst: float, calls: float = 1.0,
             debt: bool = False) -> float:
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT rate, burst, tokens, updated FROM buckets "
                                 "WHERE name = ?", (name,)).fetchone()
                bucket = TokenBucket(rate, burst)
                if row is not None and (row[0], row[1]) == (rate, burst):
                    bucket.tokens, bucket.updated = row[2], row[3]
                now = self.clock()
                if debt:
                    bucket.charge(calls, now)
                    wait = 0.0
                else:
                    wait = bucket.take(now)
                db.execute("INSERT OR REPLACE INTO buckets VALUES (?, ?, ?, ?, ?)",
                           (name, rate, burst, bucket.tokens, bucket.updated))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        return wait

    async def take_async(self, name: str, rate: float, burst: float, calls: float = 1.0,
                         debt: bool = False) -> float:
        """:meth:`take` off the event loop, from the file where it answers within
        ``wait`` seconds, else from this process's fallback buckets."""
        if time.monotonic() >= self._down_until:
            job = self._pool.submit(self.take, name, rate, burst, calls, debt)
            try:
                return await asyncio.wait_for(asyncio.wrap_future(job), self.wait * 2)
            except (sqlite3.Error, TimeoutError) as exc:
                if time.monotonic() >= self._down_until:
                    log.warning("the shared rate-limit store is unavailable (%s); limiting "
                                "per process for %g s", str(exc) or "no answer in time",
                                STORE_RETRY)
                self._down_until = time.monotonic() + STORE_RETRY
        self.on_fallback()
        return self.fallback.take(name, rate, burst, calls, debt)


@dataclass(frozen=True)
class Client:
    """One identity of the policy."""

    name: str
    roles: tuple[str, ...]
    methods: frozenset[str]
    certificate_cn: str | None = None
    api_key_sha256: str | None = None
    rate_per_second: float | None = None
    burst: float | None = None


    @property
    def sees_candidates(self) -> bool:
        return bool(SEES_CANDIDATES.intersection(self.roles))


# The identified caller of the call being served (set by the interceptor).
caller_var: ContextVar[Client | None] = ContextVar("caller", default=None)


@dataclass
class Policy:
    clients: list[Client] = field(default_factory=list)
    revoked_cns: frozenset[str] = frozenset()
    revoked_keys: frozenset[str] = frozenset()

    def by_cn(self, cn: str) -> Client | None:
        """The entry naming ``cn``, else the ``"*"`` entry (None if revoked)."""
        if cn in self.revoked_cns:
            return None
        exact = [c for c in self.clients if c.certificate_cn == cn]
        wildcard = [c for c in self.clients if c.certificate_cn == "*"]
        found = exact or wildcard
        return found[0] if found else None

    def by_key(self, key: str) -> Client | None:
        digest = hash_key(key)
        if digest in self.revoked_keys:
            return None
        for c in self.clients:
            if c.api_key_sha256 and hmac.compare_digest(c.api_key_sha256, digest):
                return c
        return None


POLICY_FIELDS = frozenset({"clients", "roles", "revoked"})
CLIENT_FIELDS = frozenset({"name", "certificate_cn", "api_key_sha256", "roles",
                           "rate_per_second", "burst"})


MAX_RATE = 100_000.0  # calls a second: above it a rate is a typo, not a limit
MAX_BURST = 1_000_000.0


def _number(value: object, name: str, where: str, low: float, high: float,
            low_included: bool) -> float:
    """A policy's number: a JSON number (not a boolean, not NaN or an infinity, nor
    1e999, which JSON reads as one) within its range, or the field named."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and (value >= low if low_included else value > low)
          and value <= high)
    if not ok:
        bound = f">= {low:g}" if low_included else f"> {low:g}"
        raise ConfigurationError(f"{where}: {name} must be a number {bound} and at most "
                                 f"{high:g}; got {json.dumps(value)}")
    return float(value)  # type: ignore[arg-type]


def _key_hash(value: object, where: str) -> str:
    if not isinstance(value, str) or len(value) != 64 or any(
            ch not in "0123456789abcdef" for ch in value):
        raise ConfigurationError(f"{where}: api_key_sha256 must be 64 lower-case hex digits "
                                 "(from `faceverify access new-key`)")
    return value


def _revoked(data: object, source: str) -> tuple[frozenset[str], frozenset[str]]:
    if not isinstance(data, list):
        raise ConfigurationError(f"{source}: 'revoked' must be a list")
    cns, keys = set(), set()
    for i, entry in enumerate(data):
        where = f"{source}: revoked[{i}]"
        if not isinstance(entry, Mapping) or len(entry) != 1 or not (
                set(entry) <= {"certificate_cn", "api_key_sha256"}):
            raise ConfigurationError(f"{where} must be {{\"certificate_cn\": ...}} or "
                                     "{\"api_key_sha256\": ...}")
        if "certificate_cn" in entry:
            if not isinstance(entry["certificate_cn"], str) or not entry["certificate_cn"]:
                raise ConfigurationError(f"{where}: certificate_cn must be a name")
            cns.add(entry["certificate_cn"])
        else:
            keys.add(_key_hash(entry["api_key_sha256"], where))
    return frozenset(cns), frozenset(keys)


def parse_policy(data: Mapping[str, Any], source: str) -> Policy:
    """A policy from its JSON form.

    Raises:
        ConfigurationError: naming the entry at fault.
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("clients"), list):
        raise ConfigurationError(f"{source}: expected an object with a 'clients' list")
    unknown_fields = set(data) - POLICY_FIELDS
    if unknown_fields:
        raise ConfigurationError(f"{source}: unknown fields {sorted(unknown_fields)}; known: "
                                 f"{sorted(POLICY_FIELDS)}")
    roles = dict(ROLES)
    extra = data.get("roles") or {}
    if not isinstance(extra, Mapping):
        raise ConfigurationError(f"{source}: 'roles' must map role names to lists of RPCs")
    for name, methods in extra.items():
        if name in ROLES:
            raise ConfigurationError(f"{source}: role {name!r} is built in and cannot be "
                                     "redefined; give yours another name")
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise ConfigurationError(f"{source}: role {name!r} must list RPC names")
        unknown = set(methods) - set(RPCS)
        if unknown:
            raise ConfigurationError(f"{source}: role {name!r} names unknown RPCs "
                                     f"{sorted(unknown)}")
        roles[name] = frozenset(methods)
    clients, names, identities = [], set(), set()
    for i, entry in enumerate(data["clients"]):
        where = f"{source}: clients[{i}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise ConfigurationError(f"{where} needs a 'name'")
        unknown_fields = set(entry) - CLIENT_FIELDS
        if unknown_fields:
            raise ConfigurationError(f"{where}: unknown fields {sorted(unknown_fields)}; "
                                     f"known: {sorted(CLIENT_FIELDS)}")
        if entry["name"] in names:
            raise ConfigurationError(f"{where}: the name {entry['name']!r} is used twice")
        names.add(entry["name"])
        cn, key = entry.get("certificate_cn"), entry.get("api_key_sha256")
        if (cn is None) == (key is None):
            raise ConfigurationError(f"{where} needs exactly one of certificate_cn, "
                                     "api_key_sha256")
        if cn is not None and (not isinstance(cn, str) or not cn):
            raise ConfigurationError(f"{where}: certificate_cn must be a name (or \"*\")")
        if key is not None:
            _key_hash(key, where)
        identity = f"cn:{cn}" if cn is not None else f"key:{key}"
        if identity in identities:
            raise ConfigurationError(f"{where}: another entry already has this "
                                     f"{'certificate_cn' if cn is not None else 'api_key_sha256'}")
        identities.add(identity)
        given = entry.get("roles")
        if not isinstance(given, list) or not given:
            raise ConfigurationError(f"{where} needs a non-empty 'roles' list")
        unknown_roles = [r for r in given if r not in roles]
        if unknown_roles:
            raise ConfigurationError(f"{where}: unknown roles {unknown_roles}; "
                                     f"known: {sorted(roles)}")
        rate, burst = entry.get("rate_per_second"), entry.get("burst")
        if "rate_per_second" in entry:
            rate = _number(rate, "rate_per_second", where, 0.0, MAX_RATE, False)
        if "burst" in entry:
            burst = _number(burst, "burst", where, 1.0, MAX_BURST, True)
        methods = frozenset().union(*(roles[r] for r in given))
        clients.append(Client(entry["name"], tuple(given), methods, cn, key, rate, burst))
    revoked_cns, revoked_keys = _revoked(data.get("revoked", []), source)
    return Policy(clients, revoked_cns, revoked_keys)


def add_client(path: Path, entry: Mapping[str, Any]) -> None:
    """Add ``entry`` to the ``clients`` of the policy file ``path``, atomically, the
    file's mode (and, as root, its owner) kept; a running server reloads it.

    Raises:
        ConfigurationError: the file is refused as :func:`read_policy` refuses it, or
            the entry does not fit in it (its name or identity already there, an
            unknown role).
    """
    read_policy(path)
    data = strict.loads(path.read_text())
    data["clients"].append(dict(entry))
    parse_policy(data, str(path))
    st = path.stat()
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"

    def write(tmp: str) -> None:
        Path(tmp).write_text(text)
        if os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)

    replace_atomically(path, write, stat.S_IMODE(st.st_mode))


def read_policy(path: Path) -> Policy:
    """The policy in ``path``.

    Raises:
        ConfigurationError: unreadable, others may change it, or it does not parse
            strictly.
    """
    check_control(path, "the access policy")
    try:
        data = strict.loads(path.read_text())
    except OSError as exc:
        raise ConfigurationError(f"cannot read the access policy {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigurationError(f"the access policy {path} is not JSON: {exc}") from exc
    return parse_policy(data, str(path))


def _burst(client: Client) -> float:
    return client.burst or max(1.0, client.rate_per_second or 1.0)


def _first(metadata: Sequence[tuple[str, Any]], *keys: str) -> str | None:
    for k, v in metadata:
        if k in keys and isinstance(v, str):
            return v
    return None


class AccessControl:
    """Decides, per call, who the caller is and whether it may make the call.

    ``policy_path`` None means no access control (insecure mode): every caller
    is :data:`ANONYMOUS` with every RPC and no rate limit.
    """

    def __init__(self, policy_path: Path | None, clock: Any = time.monotonic,
                 on_refused_reload: Any = lambda: None,
                 buckets: LocalBuckets | SharedBuckets | None = None) -> None:
        self.path = policy_path
        self.clock = clock
        self.on_refused_reload = on_refused_reload
        self.policy = read_policy(policy_path) if policy_path else None
        self._stamp = self._stat()
        self._checked = 0.0
        self.buckets = buckets or LocalBuckets(clock)

    def _stat(self) -> tuple[int, ...] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        # A chmod or chown alone is a change too: it may make the file refused.
        return (st.st_mtime_ns, st.st_size, st.st_ctime_ns, st.st_mode, st.st_uid)

    def _maybe_reload(self) -> None:
        now = self.clock()
        if self.path is None or now - self._checked < 1.0:
            return
        self._checked = now
        stamp = self._stat()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.policy = read_policy(self.path)
        except ConfigurationError as exc:
            log.error("access policy changed but is refused; keeping the previous one: %s",
                      exc)
            self.on_refused_reload()
            return
        log.info("access policy reloaded from %s (%d clients)", self.path,
                 len(self.policy.clients))

    def identify(self, auth: Mapping[str, Sequence[bytes]],
                 metadata: Sequence[tuple[str, Any]]) -> Client:
        """The caller's policy entry.

        Args:
            auth: the call's TLS auth context (``x509_common_name`` for mutual TLS).
            metadata: the call's invocation metadata.

        Raises:
            Unauthenticated: no identity, or one the policy does not know.
        """
        self._maybe_reload()
        policy = self.policy
        if policy is None:
            return Client(ANONYMOUS, (ADMIN,), ROLES[ADMIN])
        bearer = _first(metadata, "authorization")
        key = (bearer[7:].strip() if bearer and bearer.lower().startswith("bearer ")
               else _first(metadata, "x-api-key"))
        if key:
            client = policy.by_key(key)
            if client is None:
                raise Unauthenticated("the API key is not in the access policy",
                                      presented=f"key:{hash_key(key)[:12]}")
            return client
        cns = auth.get("x509_common_name") or ()
        if cns:
            cn = cns[0].decode("utf-8", "replace")
            client = policy.by_cn(cn)
            if client is None:
                raise Unauthenticated("the client certificate's common name is not in the "
                                      "access policy", presented=f"cn:{cn[:128]}")
            return client
        raise Unauthenticated("no credentials: present a client certificate (mutual TLS) or "
                              "an API key (authorization: Bearer <key>)")

    async def charge(self, client: Client, calls: int) -> None:
        """Count ``calls`` more against ``client``'s rate (see :meth:`TokenBucket.charge`)."""
        if client.rate_per_second is None or calls <= 0:
            return
        await self.buckets.take_async(client.name, client.rate_per_second, _burst(client),
                                      calls, debt=True)

    async def authorize(self, client: Client, method: str) -> None:
        """Raises RateLimited (rate) or PermissionDenied (role) for ``client`` calling
        ``method`` (an RPC name such as ``Enroll``).  The rate first: a call the
        client may not make counts against its rate too, so a flood of them is
        slowed like any other."""
        if client.rate_per_second is not None:
            wait = await self.buckets.take_async(client.name, client.rate_per_second,
                                                 _burst(client))
            if wait > 0:
                raise RateLimited(f"{client.name} is over its rate of "
                                  f"{client.rate_per_second:g} calls/s; retry in "
                                  f"{wait * 1000:.0f} ms", retry_after=wait)
        if method not in client.methods:
            raise PermissionDenied(f"{client.name} (roles {', '.join(client.roles)}) may not "
                                   f"call {method}", method=method)
