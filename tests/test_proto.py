"""The committed generated code matches proto/ (regenerate with `make proto`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.conftest import unavailable

REPO = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        unavailable("grpcio-tools not installed")
    spec = importlib.util.spec_from_file_location("generate", REPO / "proto" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(tmp_path)
    for f in sorted(tmp_path.glob("*.py*")):
        committed = REPO / "server" / "gen" / f.name
        assert committed.read_text() == f.read_text(), f"{f.name} is stale: run `make proto`"


def test_the_descriptor_set_is_up_to_date() -> None:
    """proto/faceverify.protoset (for grpcurl -protoset) is what generate.py makes."""
    spec = importlib.util.spec_from_file_location("generate", REPO / "proto" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (REPO / "proto" / "faceverify.protoset").read_bytes() == module.protoset(), \
        "stale: run `make proto`"
