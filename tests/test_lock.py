"""The lock (requirements/dev.txt) agrees with pyproject.toml, the images' cuts of it
agree with the lock, this environment was installed from it, and the code generator
it pins made server/gen.  Refresh with `make lock`."""

from __future__ import annotations

import importlib.util
import re
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

from packaging.markers import Marker
from packaging.requirements import Requirement

from tests.conftest import unavailable

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO / "requirements"


def _lock_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lock", REQUIREMENTS / "lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock = _lock_module()


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _entries(name: str) -> dict[str, list[tuple[str, str | None]]]:
    """Package -> [(version, marker or None)] of requirements/NAME.txt."""
    out: dict[str, list[tuple[str, str | None]]] = {}
    for pins in lock.pins(REQUIREMENTS / f"{name}.txt").values():
        for pin in pins:
            requirement, _, marker = pin.partition(";")
            package, version = requirement.strip().split("==")
            out.setdefault(_normal(package), []).append((version, marker.strip() or None))
    return out


def _here(entries: list[tuple[str, str | None]]) -> str | None:
    """The version of these entries that applies to this interpreter and platform."""
    versions = [v for v, marker in entries if marker is None or Marker(marker).evaluate()]
    assert len(versions) <= 1, entries
    return versions[0] if versions else None


def _hashes(name: str) -> dict[str, set[str]]:
    """Package==version -> its hashes, in requirements/NAME.txt."""
    out: dict[str, set[str]] = {}
    current = ""
    for line in (REQUIREMENTS / f"{name}.txt").read_text().splitlines():
        found = lock.PIN.match(line)
        if found:
            current = f"{_normal(found.group(1))}=={found.group(2)}"
            out[current] = set()
        for digest in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
            out[current].add(digest)
    return out


def test_every_lock_file_was_made_from_this_pyproject() -> None:
    """A dependency, extra, Python range or build backend changed in pyproject.toml
    and not locked again fails here, on every machine, before any install differs."""
    for name in ("dev", "cpu", "gpu", "uv"):
        text = (REQUIREMENTS / f"{name}.txt").read_text()
        found = re.search(r"^# pyproject-digest: ([0-9a-f]{64})$", text, re.M)
        assert found, f"requirements/{name}.txt has no pyproject digest: run `make lock`"
        assert found.group(1) == lock.digest(), \
            f"pyproject.toml changed since requirements/{name}.txt was locked: run `make lock`"


def test_the_lock_pins_every_declared_requirement_within_its_range() -> None:
    declared = lock.declarations()
    wanted = [*declared["dependencies"], *declared["optional-dependencies"]["dev"],
              *declared["build-system"]]
    locked = _entries("dev")
    for text in wanted:
        requirement = Requirement(text)
        if requirement.marker and not requirement.marker.evaluate():
            continue
        entries = locked.get(_normal(requirement.name))
        assert entries, f"{requirement.name} is not in requirements/dev.txt: run `make lock`"
        for version, _ in entries:
            assert requirement.specifier.contains(version, prereleases=True), \
                f"requirements/dev.txt pins {requirement.name}=={version} outside {text!r}"
    for digests in _hashes("dev").values():
        assert digests, "every locked package carries its hashes"


def test_the_images_take_the_locks_versions_and_files() -> None:
    dev, dev_hashes = _entries("dev"), _hashes("dev")
    for name in ("cpu", "gpu"):
        for package, entries in _entries(name).items():
            if package == "onnxruntime-gpu" or package.startswith("nvidia-"):
                assert name == "gpu"
                continue
            assert package in dev, f"{package} of requirements/{name}.txt is not in the lock"
            locked = {v for v, _ in dev[package]}
            for version, _ in entries:
                assert version in locked, f"{name}.txt has {package}=={version}, the lock {locked}"
                assert _hashes(name)[f"{package}=={version}"] <= dev_hashes[f"{package}=={version}"]
    assert "onnxruntime" in _entries("cpu") and "onnxruntime" not in _entries("gpu")
    assert "onnxruntime-gpu" in _entries("gpu")


def test_uv_is_installed_at_the_locks_release_with_its_hashes() -> None:
    (entry,) = _entries("uv")["uv"]
    assert entry[0] == _here(_entries("dev")["uv"])
    assert _hashes("uv") == {f"uv=={entry[0]}": _hashes("dev")[f"uv=={entry[0]}"]}


def test_this_environment_is_the_lock() -> None:
    """What `make setup` installed is exactly the lock: every locked package at its
    version, and nothing else but the project itself and pip (the venv's own)."""
    if sys.prefix == sys.base_prefix:
        unavailable("not in a virtual environment made by `make setup`")
    locked = {package: _here(entries) for package, entries in _entries("dev").items()}
    locked = {package: version for package, version in locked.items() if version}
    installed = {_normal(d.metadata["Name"]): d.version for d in metadata.distributions()
                 if d.metadata["Name"]}
    assert {p: installed.get(p) for p in locked} == locked
    assert set(installed) - set(locked) <= {"faceverify", "pip"}


def test_the_generated_code_comes_from_the_locked_generator() -> None:
    """server/gen was made by the grpcio-tools the lock pins (tests/test_proto.py checks
    it is what that generator makes of the proto)."""
    generated = (REPO / "server" / "gen" / "faceverify_pb2_grpc.py").read_text()
    made_by = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'$", generated, re.M)
    assert made_by
    (tools,) = {v for v, _ in _entries("dev")["grpcio-tools"]}
    assert made_by.group(1) == tools, "run `make proto` with the locked grpcio-tools"
