"""The code's structure: one table of RPC rules that covers the proto, no import
cycle in ``server/`` or ``index/``, and the folders as layers: a module imports
only from its own layer and those below it."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from server.api.access import ROLES, AccessControl, parse_policy
from server.api.rpcs import ADMIN, AUDITED, DURABLE, RPCS
from server.errors import ConfigurationError
from server.gen import faceverify_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent


def test_the_rpc_table_names_every_method_of_the_service_and_no_other() -> None:
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["FaceVerification"].methods}
    assert set(RPCS) == methods


def test_admin_and_an_insecure_server_may_call_every_method() -> None:
    assert ROLES[ADMIN] == frozenset(RPCS)
    anonymous = AccessControl(None).identify({}, ())
    for name in RPCS:
        asyncio.run(AccessControl(None).authorize(anonymous, name))  # raises if refused


def test_every_rpc_has_a_role_besides_admin_unless_it_erases() -> None:
    # Erasure is the one call no everyday role may make.
    assert {name for name, rpc in RPCS.items() if not rpc.roles} == {"DeleteEnrollment"}
    assert ROLES["verifier"] == {"Verify", "StartLiveness", "GetServerInfo"}
    assert ROLES["registrar"] == {"Enroll", "StartLiveness", "GetEnrollment", "Search",
                                  "GetServerInfo"}
    assert ROLES["reviewer"] == {"ListReviews", "ResolveReview", "GetEnrollment",
                                 "GetServerInfo"}


def test_state_changes_are_audited_durably() -> None:
    assert {"Enroll", "DeleteEnrollment", "ResolveReview"} == DURABLE
    assert DURABLE < AUDITED
    assert {"GetEnrollment", "Search"} == AUDITED - DURABLE


def test_a_policy_role_may_name_only_rpcs_of_the_table() -> None:
    policy = parse_policy({"clients": [{"name": "a", "api_key_sha256": "0" * 64,
                                        "roles": ["auditor"]}],
                           "roles": {"auditor": ["GetEnrollment"]}}, "p.json")
    assert policy.clients[0].methods == {"GetEnrollment"}
    with pytest.raises(ConfigurationError, match=r"unknown RPCs \['Erase'\]"):
        parse_policy({"clients": [], "roles": {"auditor": ["Erase"]}}, "p.json")


def _imports() -> dict[str, set[str]]:
    """Each module of server/ and index/ (generated code aside) and the modules of
    those packages it imports, at any depth of the file (function-level too)."""
    files = {}
    for package in ("server", "index"):
        for f in (ROOT / package).rglob("*.py"):
            if "gen" in f.relative_to(ROOT).parts:
                continue
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = f
    graph: dict[str, set[str]] = {}
    for name, f in files.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in files else node.module)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.append(w)
            on_stack.discard(v)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_server_or_index() -> None:
    graph = _imports()
    assert "server.tools.cli" in graph and "index.registry" in graph  # the walk found the code
    assert _cycles(graph) == []


def test_the_storage_layer_imports_nothing_of_the_service() -> None:
    graph = _imports()
    assert {(m, d) for m, deps in graph.items() if m.startswith("index")
            for d in deps if d.startswith("server")} == set()


# The layers, lowest first: what a module's folder says it may import.
LAYERS = (
    ("foundations: errors, settings' declarations, strict JSON; storage (index/ imports "
     "nothing of server/)", ("server", "server.errors", "server.strict", "server.options",
                             "index")),
    ("model file formats", ("server.models.manifest", "server.models.convert",
                            "server.models.dlib_format")),
    ("pipeline: image to faces to embeddings, model calls batched", ("server.pipeline",)),
    ("model sets: build, repair, quantize, calibrate", ("server.models",)),
    ("core: the decisions (verification, enrolment, duplicates) and their metrics",
     ("server.core", "server.config")),
    ("api: the gRPC edge (servicer, interceptor, access, audit, the server process)",
     ("server.api",)),
    ("tools: the CLI and the client", ("server.tools",)),
)


def _layer(module: str) -> int:
    """The layer of the longest prefix naming ``module`` (``server`` names only itself)."""
    found = [(len(prefix), rank) for rank, (_, prefixes) in enumerate(LAYERS)
             for prefix in prefixes
             if module == prefix or module.startswith(prefix + ".") and prefix != "server"]
    assert found, f"{module} is in no layer of LAYERS"
    return max(found)[1]


def test_every_module_is_in_a_layer_and_imports_none_above_its_own() -> None:
    graph = _imports()
    upward = {(m, d) for m, deps in graph.items() for d in deps if _layer(d) > _layer(m)}
    assert upward == set()


def test_the_layer_check_sees_an_upward_import() -> None:
    assert _layer("server.pipeline.faces") < _layer("server.core.enrolment") < _layer(
        "server.api.servicer") < _layer("server.tools.cli")
    assert _layer("server.errors") == _layer("index.registry") == 0
    assert _layer("server.models.manifest") < _layer("server.pipeline.loader") < _layer(
        "server.models.build")


def test_no_error_carries_a_transport_status() -> None:
    import index.errors
    import server.errors

    for module in (index.errors, server.errors):
        assert "grpc" not in (ROOT / Path(*module.__name__.split("."))).with_suffix(
            ".py").read_text()
