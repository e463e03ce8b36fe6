"""Every RPC of the FaceVerification service and the rules that apply to it, in one table.

A method added to the proto is added here or the tests fail
(``tests/test_rpcs.py`` compares this table with the service descriptor); the
built-in roles of :mod:`server.api.access` and the audit's lists are read from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

ADMIN = "admin"  # the role that may call every RPC


@dataclass(frozen=True)
class Rpc:
    """What applies to one RPC.

    Attributes:
        roles: the built-in roles, besides ``admin``, that may call it.
        audited: every outcome goes to the audit log (other calls go there only
            when access control refuses them).
        durable: a state change, whose audit record is on disk (fsynced) before
            the call is answered; the other records are flushed.
        charged: the response's repeated field whose length, past the first,
            is charged to the caller's rate limit as calls (each NIK returned
            costs a call, so that the limit bounds what can be listed).
    """

    roles: frozenset[str]
    audited: bool
    durable: bool
    charged: str = ""


def _rpc(*roles: str, audited: bool = False, durable: bool = False, charged: str = "") -> Rpc:
    return Rpc(frozenset(roles), audited or durable, durable, charged)


RPCS: Mapping[str, Rpc] = {
    "Verify": _rpc("verifier"),
    "Enroll": _rpc("registrar", durable=True),
    "Search": _rpc("registrar", audited=True, charged="candidates"),
    "GetEnrollment": _rpc("registrar", "reviewer", audited=True),
    "DeleteEnrollment": _rpc(durable=True),
    "ListReviews": _rpc("reviewer"),
    "ResolveReview": _rpc("reviewer", durable=True),
    "GetServerInfo": _rpc("verifier", "registrar", "reviewer"),
    "StartLiveness": _rpc("verifier", "registrar"),
}

# Services open to every caller without identity or rate checks: load balancers
# and probes must reach health whatever the policy says.
OPEN_SERVICES = ("/grpc.health.v1.Health/",)

# Who sees other people's NIKs in an enrolment's candidate list (GetEnrollment):
# the people who decide on duplicates.
SEES_CANDIDATES = frozenset({"reviewer", ADMIN})

AUDITED = frozenset(name for name, rpc in RPCS.items() if rpc.audited)
DURABLE = frozenset(name for name, rpc in RPCS.items() if rpc.durable)


def builtin_roles() -> dict[str, frozenset[str]]:
    """Each built-in role and the RPCs it may call, ``admin`` every one."""
    roles: dict[str, set[str]] = {ADMIN: set(RPCS)}
    for name, rpc in RPCS.items():
        for role in rpc.roles:
            roles.setdefault(role, set()).add(name)
    return {role: frozenset(names) for role, names in roles.items()}
