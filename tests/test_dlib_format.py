"""The dlib stream reader, on the documented encodings and on the real model files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.models.build import DLIB_FILES, source_dir
from server.models.dlib_format import DlibFormatError, Stream, read_net, read_shape_predictor


@pytest.mark.parametrize(("raw", "value"), [
    ("01 00", 0), ("01 96", 150), ("81 0A", -10), ("02 F4 01", 500),
])
def test_integers(raw: str, value: int) -> None:
    assert Stream(bytes.fromhex(raw)).integer() == value


@pytest.mark.parametrize(("raw", "value"), [
    ("01 10 81 04", 1.0), ("03 0A D7 A3 81 1C", 0.04), ("01 00 01 0B", 0.0),
])
def test_reals(raw: str, value: float) -> None:
    assert Stream(bytes.fromhex(raw)).real() == pytest.approx(value, rel=1e-7)


def test_real_infinity() -> None:
    assert Stream(bytes.fromhex("01 00 02 00 7D")).real() == math.inf


def test_bool_string_and_empty_tensor() -> None:
    empty_tensor = bytes.fromhex("01 02 01 00 01 00 01 00 01 00")
    s = Stream(b"1" + bytes.fromhex("01 05") + b"con_4" + empty_tensor)
    assert s.boolean() is True
    assert s.string() == "con_4"
    assert s.tensor().shape == (0, 0, 0, 0)
    assert s.at_end()


def test_bad_control_byte_names_the_offset() -> None:
    with pytest.raises(DlibFormatError, match="byte offset 0"):
        Stream(bytes.fromhex("70 00")).integer()


def test_truncated_stream_is_an_error() -> None:
    with pytest.raises(DlibFormatError):
        read_net(source_dir().joinpath(DLIB_FILES["detector"]).read_bytes()[:5000])


def test_resnet_file_has_dlib_documented_structure() -> None:
    net = read_net(source_dir().joinpath(DLIB_FILES["recognizer"]).read_bytes())
    kinds = [layer.kind for layer in net.layers]
    assert kinds.count("con_4") == 29 and kinds.count("add_prev_") == 14
    assert net.input["size"] == (150, 150)
    assert net.input["mean_rgb"] == pytest.approx((122.782, 117.001, 104.298), abs=1e-3)
    params = sum(layer.params["weight"].size + layer.params.get("bias", np.zeros(0)).size
                 for layer in net.layers if "weight" in layer.params)
    params += sum(2 * layer.params["gamma"].size for layer in net.layers if layer.kind == "affine_")
    assert params == 5_614_592


def test_mmod_file_has_dlib_documented_structure() -> None:
    net = read_net(source_dir().joinpath(DLIB_FILES["detector"]).read_bytes())
    assert net.loss["window"] == (80, 80)
    assert net.loss["nms_iou"] == pytest.approx(0.33828, abs=1e-5)
    assert [layer.kind for layer in net.layers].count("con_4") == 7


def test_shape_predictor_arrays() -> None:
    sp = read_shape_predictor(source_dir().joinpath(DLIB_FILES["landmarks"]).read_bytes())
    assert sp.initial_shape.shape == (5, 2)
    assert sp.split_idx.shape == (15, 500, 15, 2)
    assert sp.leaves.shape == (15, 500, 16, 5, 2)
    assert sp.anchor_idx.shape == (15, 800) and sp.anchor_idx.max() < 5
    assert sp.deltas.shape == (15, 800, 2)
