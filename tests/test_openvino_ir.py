"""Operator models: OpenVINO IR imported by our own converter, validated at build,
recognizer input layouts recorded in the manifest.

The IR conversion is checked against the ``openvino`` package's own output on
Intel's face-reidentification-retail-0095 (an operator supplies it; the test
reads ``../shared/models``).  ``openvino`` is no dependency of the project: it
is installed into a cache folder and run in a subprocess, as the oldest
onnxruntime is in ``test_portability``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from server.errors import ModelError
from server.models.build import import_operator_models, operator_recognizer
from server.models.manifest import read_manifest
from server.models.openvino_ir import ir_to_onnx
from server.models.rewrite import prelu_as_relu, same_outputs
from server.pipeline.faces import FacePolicy
from server.pipeline.geometry import umeyama
from server.pipeline.image import ImageLimits
from server.pipeline.loader import load_models
from server.pipeline.recognizers import SPHEREFACE_TEMPLATE, template_chip
from tests.conftest import lfw_image, unavailable

OPENVINO = "2026.4.1"
INTEL = "face-reidentification-retail-0095"

REFERENCE = """
import sys
import numpy as np
import openvino as ov
model = ov.Core().compile_model(sys.argv[1], "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
x = np.load(sys.argv[2])
np.save(sys.argv[3], np.concatenate([model([x[i:i + 1]])[model.output(0)]
                                     for i in range(len(x))]))
"""


@pytest.fixture(scope="module")
def intel_xml(third_party_models: Path) -> Path:
    path = third_party_models / INTEL / f"{INTEL}.xml"
    if not path.is_file():
        unavailable(f"{path} not found (an operator-supplied model)")
    return path


@pytest.fixture(scope="module")
def openvino_site() -> Path:
    """The openvino package, cached outside the project's environment."""
    site = Path.home() / ".cache" / "faceverify" / f"openvino-{OPENVINO}"
    if not (site / "openvino").is_dir():
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
             "--only-binary=:all:", "--target", str(site), f"openvino=={OPENVINO}",
             "openvino-telemetry"], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"could not install openvino {OPENVINO}: {done.stderr[-500:]}")
            pytest.skip(f"openvino {OPENVINO} not installable here (no registry?)")
    return site


def test_converted_ir_computes_what_openvino_computes(intel_xml: Path, openvino_site: Path,
                                                      tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (3, 3, 128, 128)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "PYTHONPATH": str(openvino_site)}
    done = subprocess.run([sys.executable, "-c", REFERENCE, str(intel_xml),
                           str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, env=env, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = np.load(tmp_path / "y.npy").reshape(3, -1)
    session = ort.InferenceSession(ir_to_onnx(intel_xml).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert got.shape == (3, 256, 1, 1)  # the batch axis is free; the IR fixed it at 1
    got = got.reshape(3, -1)
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()


def test_prelu_rewrite_keeps_every_output_bit(intel_xml: Path) -> None:
    model = ir_to_onnx(intel_xml)
    rewritten = prelu_as_relu(model)
    assert sum(n.op_type == "PRelu" for n in model.graph.node) == 48
    assert not any(n.op_type == "PRelu" for n in rewritten.graph.node)
    same_outputs(model, rewritten, "intel")  # raises on any difference


def test_a_rewrite_that_changes_outputs_is_refused(intel_xml: Path) -> None:
    model = ir_to_onnx(intel_xml)
    broken = prelu_as_relu(model)
    sub = next(n for n in broken.graph.node if n.op_type == "Sub")
    sub.op_type = "Add"
    with pytest.raises(ModelError, match="outputs differ"):
        same_outputs(model, broken, "intel")


def _ir(tmp_path: Path, op: str) -> Path:
    xml = f"""<?xml version="1.0"?>
<net name="tiny" version="11"><layers>
<layer id="0" name="x" type="Parameter" version="opset1">
 <data shape="1,3,8,8" element_type="f32"/>
 <output><port id="0" precision="FP32"><dim>1</dim><dim>3</dim><dim>8</dim><dim>8</dim></port>
 </output></layer>
<layer id="1" name="odd" type="{op}" version="opset1">
 <input><port id="0"><dim>1</dim><dim>3</dim><dim>8</dim><dim>8</dim></port></input>
 <output><port id="1"><dim>1</dim><dim>3</dim><dim>8</dim><dim>8</dim></port></output></layer>
<layer id="2" name="out" type="Result" version="opset1">
 <input><port id="0"><dim>1</dim><dim>3</dim><dim>8</dim><dim>8</dim></port></input></layer>
</layers><edges>
<edge from-layer="0" from-port="0" to-layer="1" to-port="0"/>
<edge from-layer="1" from-port="1" to-layer="2" to-port="0"/>
</edges></net>"""
    path = tmp_path / "tiny.xml"
    path.write_text(xml)
    path.with_suffix(".bin").write_bytes(b"")
    return path


def test_ir_ops_outside_the_set_and_missing_weights_are_refused_by_name(tmp_path: Path) -> None:
    session = ort.InferenceSession(ir_to_onnx(_ir(tmp_path, "Sigmoid")).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = np.linspace(-3, 3, 2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], 1 / (1 + np.exp(-x)), rtol=1e-5)
    with pytest.raises(ModelError, match="layer 'odd' is a Interpolate, which the IR importer "
                                         "does not convert"):
        ir_to_onnx(_ir(tmp_path, "Interpolate"))
    path = _ir(tmp_path, "Sigmoid")
    path.with_suffix(".bin").unlink()
    with pytest.raises(ModelError, match="tiny.bin are not beside it"):
        ir_to_onnx(path)
    path.with_suffix(".bin").write_bytes(b"")
    path.write_text("version https://git-lfs.github.com/spec/v1\n")  # a Git LFS pointer
    with pytest.raises(ModelError, match="tiny.xml is not an OpenVINO IR XML file"):
        operator_recognizer(path)


def test_a_non_square_template_chip_puts_the_landmarks_on_the_template() -> None:
    # A face turned by 20 degrees, twice the template's size, somewhere in a photo.
    angle = np.radians(20)
    rot = 2 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = SPHEREFACE_TEMPLATE @ rot.T + np.array([150.0, 60.0])
    image = np.zeros((400, 400, 3), dtype=np.uint8)
    for x, y in landmarks.round().astype(int):
        image[y - 1:y + 2, x - 1:x + 2] = 255
    chip = template_chip(image, landmarks, SPHEREFACE_TEMPLATE, 96, 112)
    assert chip.shape == (112, 96, 3)
    for tx, ty in SPHEREFACE_TEMPLATE.round().astype(int):
        assert chip[ty - 1:ty + 2, tx - 1:tx + 2].max() > 100  # each dot landed on its point
    a, _ = umeyama(SPHEREFACE_TEMPLATE, landmarks)
    assert abs(np.hypot(*a[:, 0]) - 2) < 1e-9


def test_operator_ir_recognizer_is_built_validated_and_served(
        intel_xml: Path, third_party_models: Path, lfw_dir: Path, tmp_path: Path) -> None:
    yunet = third_party_models / "yunet_2023mar.onnx"
    face = lfw_dir / "images" / "Abel_Pacheco" / "Abel_Pacheco_0001.jpg"
    m = import_operator_models(tmp_path / "intel", yunet, intel_xml, "openvino-reid",
                               prelu="conv", check_image=face)
    rec = m["recognizer"]
    assert rec["kind"] == "template" and rec["file"] == f"{INTEL}.onnx"
    assert rec["chip"] == [128, 128] and rec["colour"] == "bgr" and rec["mean"] == [0, 0, 0]
    # The 96x112 template stretched to 128x128, as Intel's demo aligns.
    np.testing.assert_allclose(rec["template"], SPHEREFACE_TEMPLATE * [128 / 96, 128 / 112],
                               atol=1e-4)
    assert set(m["sources"]["files"]) == {yunet.name, f"{INTEL}.xml", f"{INTEL}.bin"}
    assert read_manifest(tmp_path / "intel") == m
    onnx.checker.check_model(str(tmp_path / "intel" / f"{INTEL}.onnx"))

    models = load_models(tmp_path / "intel", "cpu", 0, ImageLimits(), FacePolicy())
    assert models.pipeline.recognizer.dim == 256

    def embed(name: str, i: int) -> np.ndarray:
        return models.pipeline.analyse(lfw_image(lfw_dir, name, i), "image", False).embedding

    same = float(embed("Abel_Pacheco", 1) @ embed("Abel_Pacheco", 4))
    other = float(embed("Abel_Pacheco", 1) @ embed("Dean_Barker", 1))
    assert same > other + 0.3

    # Another input spec is another model version (its embeddings mean something else).
    other_spec = import_operator_models(tmp_path / "rgb", yunet, intel_xml, "openvino-reid",
                                        colour="rgb")
    assert other_spec["recognizer"]["layout"] == "custom"
    assert other_spec["model_version"] != m["model_version"]
    assert json.loads((tmp_path / "intel" / "manifest.json").read_text())["model_version"] \
        == m["model_version"]


def test_operator_models_that_do_not_fit_their_layout_are_refused_by_name(
        third_party_models: Path, lfw_dir: Path, tmp_path: Path) -> None:
    yunet = third_party_models / "yunet_2023mar.onnx"
    mobile = third_party_models / "mobilefacenet_128d.onnx"
    with pytest.raises(ModelError, match="yunet_2023mar.onnx: input must be .N, 3, H, W. "
                                         "with H and W fixed"):
        import_operator_models(tmp_path / "m", yunet, yunet)
    no_face = tmp_path / "wall.png"
    from PIL import Image
    Image.new("RGB", (200, 200), (120, 110, 100)).save(no_face)
    with pytest.raises(ModelError, match="no usable face in wall.png"):
        import_operator_models(tmp_path / "m", yunet, mobile, check_image=no_face)
    assert not (tmp_path / "m" / "manifest.json").exists()  # nothing written on refusal
