"""The committed generated code matches proto/ (regenerate with `make proto`)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

from tests.conftest import unavailable

REPO = Path(__file__).resolve().parent.parent


def _proto_script(name: str) -> ModuleType:
    """proto/NAME.py, loaded as a module (proto/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "proto" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        unavailable("grpcio-tools not installed")
    module = _proto_script("generate")
    module.generate(tmp_path)
    for f in sorted(tmp_path.glob("*.py*")):
        committed = REPO / "server" / "gen" / f.name
        assert committed.read_text() == f.read_text(), f"{f.name} is stale: run `make proto`"


def test_the_descriptor_set_is_up_to_date() -> None:
    """proto/faceverify.protoset (for grpcurl -protoset) is what generate.py makes."""
    module = _proto_script("generate")
    assert (REPO / "proto" / "faceverify.protoset").read_bytes() == module.protoset(), \
        "stale: run `make proto`"


def test_the_api_reference_is_the_protos_comments() -> None:
    """docs/api-reference.md is what proto/reference.py makes of the proto."""
    if importlib.util.find_spec("grpc_tools") is None:
        unavailable("grpcio-tools not installed")
    module = _proto_script("reference")
    page = module.render()
    assert "### Verify" in page and "| `selfie` | `bytes` | 2 |" in page
    assert (REPO / "docs" / "api-reference.md").read_text() == page, "stale: run `make proto`"


def test_the_proto_names_every_reason_with_its_code() -> None:
    """The proto's header (and so the API reference) lists every reason the server
    answers, each with the status code the interceptor gives it."""
    from server.api.interceptor import STATUS

    header = (REPO / "proto" / "faceverify" / "v1" / "faceverify.proto").read_text()
    header = header[:header.index("syntax =")]
    for reason, code in STATUS.items():
        assert re.search(rf"//\s+{code.name}\s+{reason}\b", header), \
            f"the proto's error list lacks {code.name} {reason}"
