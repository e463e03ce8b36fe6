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

``roles`` adds to (or redefines) the built-in :data:`ROLES`.  A client entry
with ``"certificate_cn": "*"`` matches every certificate the client CA signed.
The health service is open to every caller (load balancers and probes).  The
file is read again when it changes; a change that does not parse is logged and
the previous policy stays.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.errors import ConfigurationError, PermissionDenied, RateLimited, Unauthenticated
from server.rpcs import ADMIN, RPCS, builtin_roles

log = logging.getLogger(__name__)

# The built-in roles, from the table of RPCs (:data:`server.rpcs.RPCS`).
ROLES: dict[str, frozenset[str]] = builtin_roles()
API_KEY_PREFIX = "fv_"
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

    def take(self, now: float) -> float:
        """0 if a call may go ahead now (and count it), else seconds until one may."""
        if self.updated == 0.0:
            self.tokens, self.updated = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


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


@dataclass
class Policy:
    clients: list[Client] = field(default_factory=list)

    def by_cn(self, cn: str) -> Client | None:
        exact = [c for c in self.clients if c.certificate_cn == cn]
        wildcard = [c for c in self.clients if c.certificate_cn == "*"]
        found = exact or wildcard
        return found[0] if found else None

    def by_key(self, key: str) -> Client | None:
        digest = hash_key(key)
        for c in self.clients:
            if c.api_key_sha256 and hmac.compare_digest(c.api_key_sha256, digest):
                return c
        return None


def parse_policy(data: Mapping[str, Any], source: str) -> Policy:
    """A policy from its JSON form.

    Raises:
        ConfigurationError: naming the entry at fault.
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("clients"), list):
        raise ConfigurationError(f"{source}: expected an object with a 'clients' list")
    roles = dict(ROLES)
    extra = data.get("roles") or {}
    if not isinstance(extra, Mapping):
        raise ConfigurationError(f"{source}: 'roles' must map role names to lists of RPCs")
    for name, methods in extra.items():
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise ConfigurationError(f"{source}: role {name!r} must list RPC names")
        unknown = set(methods) - set(RPCS)
        if unknown:
            raise ConfigurationError(f"{source}: role {name!r} names unknown RPCs "
                                     f"{sorted(unknown)}")
        roles[name] = frozenset(methods)
    clients, names = [], set()
    for i, entry in enumerate(data["clients"]):
        where = f"{source}: clients[{i}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise ConfigurationError(f"{where} needs a 'name'")
        if entry["name"] in names:
            raise ConfigurationError(f"{where}: the name {entry['name']!r} is used twice")
        names.add(entry["name"])
        cn, key = entry.get("certificate_cn"), entry.get("api_key_sha256")
        if (cn is None) == (key is None):
            raise ConfigurationError(f"{where} needs exactly one of certificate_cn, "
                                     "api_key_sha256")
        if key is not None and (not isinstance(key, str) or len(key) != 64
                                or any(ch not in "0123456789abcdef" for ch in key)):
            raise ConfigurationError(f"{where}: api_key_sha256 must be 64 lower-case hex "
                                     "digits (from `faceverify access new-key`)")
        given = entry.get("roles")
        if not isinstance(given, list) or not given:
            raise ConfigurationError(f"{where} needs a non-empty 'roles' list")
        unknown_roles = [r for r in given if r not in roles]
        if unknown_roles:
            raise ConfigurationError(f"{where}: unknown roles {unknown_roles}; "
                                     f"known: {sorted(roles)}")
        rate, burst = entry.get("rate_per_second"), entry.get("burst")
        if rate is not None and not (isinstance(rate, (int, float)) and rate > 0):
            raise ConfigurationError(f"{where}: rate_per_second must be a positive number")
        if burst is not None and not (isinstance(burst, (int, float)) and burst >= 1):
            raise ConfigurationError(f"{where}: burst must be >= 1")
        methods = frozenset().union(*(roles[r] for r in given))
        clients.append(Client(entry["name"], tuple(given), methods, cn, key,
                              None if rate is None else float(rate),
                              None if burst is None else float(burst)))
    return Policy(clients)


def read_policy(path: Path) -> Policy:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigurationError(f"cannot read the access policy {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigurationError(f"the access policy {path} is not JSON: {exc}") from exc
    return parse_policy(data, str(path))


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

    def __init__(self, policy_path: Path | None, clock: Any = time.monotonic) -> None:
        self.path = policy_path
        self.clock = clock
        self.policy = read_policy(policy_path) if policy_path else None
        self._stamp = self._stat()
        self._checked = 0.0
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def _stat(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

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
            log.error("access policy changed but does not load; keeping the previous one: %s",
                      exc)
            return
        with self._lock:
            self._buckets.clear()
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
                raise Unauthenticated("the API key is not in the access policy")
            return client
        cns = auth.get("x509_common_name") or ()
        if cns:
            cn = cns[0].decode("utf-8", "replace")
            client = policy.by_cn(cn)
            if client is None:
                raise Unauthenticated("the client certificate's common name is not in the "
                                      "access policy")
            return client
        raise Unauthenticated("no credentials: present a client certificate (mutual TLS) or "
                              "an API key (authorization: Bearer <key>)")

    def authorize(self, client: Client, method: str) -> None:
        """Raises PermissionDenied (role) or RateLimited (rate) for ``client`` calling
        ``method`` (an RPC name such as ``Enroll``)."""
        if method not in client.methods:
            raise PermissionDenied(f"{client.name} (roles {', '.join(client.roles)}) may not "
                                   f"call {method}", method=method)
        if client.rate_per_second is None:
            return
        with self._lock:
            bucket = self._buckets.get(client.name)
            if bucket is None:
                bucket = self._buckets[client.name] = TokenBucket(
                    client.rate_per_second, client.burst or max(1.0, client.rate_per_second))
            wait = bucket.take(self.clock())
        if wait > 0:
            raise RateLimited(f"{client.name} is over its rate of {client.rate_per_second:g} "
                              f"calls/s; retry in {wait * 1000:.0f} ms", retry_after=wait)
