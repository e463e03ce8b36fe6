"""Every ONNX graph the project writes loads in the oldest onnxruntime pyproject allows.

onnx stamps its own newest IR version on a model unless told otherwise, and
an older onnxruntime refuses such a file outright (onnxruntime 1.31, the
current onnxruntime-gpu, refused IR 14).  The oldest allowed onnxruntime is
installed, with a numpy it was built for, into a cache folder outside the
project's environment and run in a subprocess on: the default model set, the
MMOD set, and the graph the MMOD detector builds at run time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from server.pipeline.mmod import resize_graph

REPO = Path(__file__).resolve().parent.parent
# onnxruntime wheels before 1.19 are built against numpy 1.x.
FLOOR_NUMPY = "1.26.4"

LOAD_AND_RUN = """
import sys
import numpy as np
import onnxruntime as ort
print(ort.__version__)
for path in sys.argv[1:]:
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in s.get_inputs():
        if i.name == "sizes":
            feeds[i.name] = np.array([1, 64, 20, 20], dtype=np.int64)  # x is [1, 64, 64, 64]
            continue
        shape = [d if isinstance(d, int) else (1 if k == 0 else 64)
                 for k, d in enumerate(i.shape)]
        dtype = np.uint8 if i.type == "tensor(uint8)" else np.float32
        feeds[i.name] = np.zeros(shape, dtype=dtype)
    outs = s.run(None, feeds)
    assert all(np.isfinite(o).all() for o in outs), path
    print("ok", path)
"""


def onnxruntime_floor() -> str:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'"onnxruntime>=([0-9.]+)"', text)
    assert match, "pyproject.toml names no onnxruntime floor"
    return match.group(1)


@pytest.fixture(scope="module")
def floor_site() -> Path:
    """onnxruntime at pyproject's floor (+ numpy), cached; skips outside CI if pip can't."""
    version = onnxruntime_floor()
    site = Path.home() / ".cache" / "faceverify" / f"onnxruntime-{version}"
    if not (site / "onnxruntime").is_dir():
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
             "--only-binary=:all:", "--target", str(site), f"onnxruntime=={version}",
             f"numpy=={FLOOR_NUMPY}"], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"could not install onnxruntime {version}: {done.stderr[-500:]}")
            pytest.skip(f"onnxruntime {version} not installable here (no registry?)")
    return site


def run_floor(site: Path, paths: list[Path]) -> str:
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    # -S: not the project's site-packages (their numpy is newer than the floor's).
    done = subprocess.run([sys.executable, "-S", "-c", LOAD_AND_RUN, *map(str, paths)],
                          capture_output=True, text=True, env=env, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_built_models_load_in_the_oldest_allowed_onnxruntime(
        floor_site: Path, dlib_model_dir: Path, mmod_model_dir: Path, tmp_path: Path) -> None:
    resize = tmp_path / "resize.onnx"
    onnx.save(resize_graph(), str(resize))
    paths = [*sorted(dlib_model_dir.glob("*.onnx")), *sorted(mmod_model_dir.glob("*.onnx")),
             resize]
    out = run_floor(floor_site, paths)
    assert out.splitlines()[0] == onnxruntime_floor()
    assert out.count("ok ") == len(paths)


def test_every_written_graph_has_the_ir_version_its_opset_needs(
        dlib_model_dir: Path, mmod_model_dir: Path) -> None:
    for path in [*dlib_model_dir.glob("*.onnx"), *mmod_model_dir.glob("*.onnx")]:
        m = onnx.load(str(path), load_external_data=False)
        assert m.ir_version == onnx.helper.find_min_ir_version_for(list(m.opset_import)), path
    assert resize_graph().ir_version == 7  # opset 13


def test_the_server_runs_without_the_optional_packages() -> None:
    """psycopg (a PostgreSQL registry) is imported only when configured: a host
    without it still serves the embedded default.  (cryptography is required: the
    audit log's checkpoints are signed with Ed25519.)"""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('psycopg', 'psycopg_pool'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import server.api.app, server.tools.cli\n"
        "from index.sealing import Sealer\n"
        "assert Sealer().seal(b'x', b'c') == b'x'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
