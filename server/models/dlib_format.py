"""Reader for dlib's binary serialization format (``.dat`` model files).

Follows ``shared/docs/dlib-format.md``: integers are sign-magnitude with a
control byte, floats are a (mantissa, exponent) pair of such integers, DNN
tensors are raw little-endian float32.  Only what the three
``face_recognition_models`` files use is implemented; anything else raises
:class:`DlibFormatError` naming the offset, so a changed file fails loudly
instead of producing a silently wrong model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class DlibFormatError(ValueError):
    """The stream does not have the layout this reader expects."""


class Stream:
    """A cursor over the bytes of one dlib serialization stream."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(f"{what} at byte offset {self.pos}")

    def integer(self) -> int:
        """A signed or unsigned integer of any width."""
        data, pos = self.data, self.pos
        if pos >= len(data):
            raise self._fail("unexpected end of stream")
        control = data[pos]
        size = control & 0x0F
        if control & 0x70 or size > 8:
            raise self._fail(f"bad integer control byte 0x{control:02x}")
        value = int.from_bytes(data[pos + 1 : pos + 1 + size], "little")
        self.pos = pos + 1 + size
        return -value if control & 0x80 else value

    def real(self) -> float:
        """A float/double: mantissa then exponent, value = m * 2**e."""
        mantissa = self.integer()
        exponent = self.integer()
        if exponent >= 32000:
            return {32000: math.inf, 32001: -math.inf}.get(exponent, math.nan)
        return math.ldexp(mantissa, exponent)

    def reals(self, count: int) -> np.ndarray:
        return np.array([self.real() for _ in range(count)], dtype=np.float64)

    def boolean(self) -> bool:
        byte = self.data[self.pos]
        if byte not in (0x30, 0x31):
            raise self._fail(f"bad bool byte 0x{byte:02x}")
        self.pos += 1
        return byte == 0x31

    def string(self) -> str:
        length = self.integer()
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        return raw.decode("ascii")

    def expect(self, tag: str) -> None:
        start = self.pos
        got = self.string()
        if got != tag:
            self.pos = start
            raise self._fail(f"expected record {tag!r}, found {got!r}")

    def tensor(self) -> np.ndarray:
        """A ``resizable_tensor``: version 2, shape (n, k, nr, nc), float32 data."""
        version = self.integer()
        if version != 2:
            raise self._fail(f"unsupported tensor version {version}")
        shape = tuple(self.integer() for _ in range(4))
        count = int(np.prod(shape))
        end = self.pos + 4 * count
        if end > len(self.data):
            raise self._fail("tensor runs past the end of the stream")
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos)
        self.pos = end
        return values.reshape(shape).astype(np.float32)

    def alias_tensor(self) -> tuple[int, int, int, int]:
        version = self.integer()
        if version != 1:
            raise self._fail(f"unsupported alias_tensor version {version}")
        n, k, nr, nc = (self.integer() for _ in range(4))
        return (n, k, nr, nc)

    def float_matrix(self) -> np.ndarray:
        rows = -self.integer()
        cols = -self.integer()
        if rows < 0 or cols < 0:
            raise self._fail("bad matrix shape")
        return self.reals(rows * cols).reshape(rows, cols)

    def at_end(self) -> bool:
        return self.pos == len(self.data)


@dataclass
class Layer:
    """One computational layer record of a dlib DNN, in input-to-output order."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)


def _read_layer(s: Stream) -> Layer:
    tag = s.string()
    p: dict[str, Any] = {}
    if tag == "con_4":
        params = s.tensor().reshape(-1)
        p["num_filters"] = s.integer()
        p["kh"], p["kw"] = s.integer(), s.integer()
        p["stride"] = (s.integer(), s.integer())
        p["padding"] = (s.integer(), s.integer())
        f, c, kh, kw = s.alias_tensor()
        s.alias_tensor()  # biases view
        s.reals(4)  # learning-rate and weight-decay multipliers
        n_weights = f * c * kh * kw
        p["weight"] = params[:n_weights].reshape(f, c, kh, kw).copy()
        p["bias"] = params[n_weights : n_weights + f].copy()
    elif tag == "affine_":
        params = s.tensor().reshape(-1)
        s.alias_tensor()
        s.alias_tensor()
        p["mode"] = s.integer()
        half = params.size // 2
        p["gamma"], p["beta"] = params[:half].copy(), params[half:].copy()
    elif tag == "bn_con2":
        params = s.tensor().reshape(-1)
        s.alias_tensor()
        s.alias_tensor()
        s.tensor()  # means of the last training batch: must not be used
        s.tensor()  # invstds of the last training batch
        running_means = s.tensor().reshape(-1)
        running_vars = s.tensor().reshape(-1)
        s.integer()  # num_updates
        s.integer()  # running_stats_window_size
        s.reals(4)
        eps = s.real()
        half = params.size // 2
        # Fold into the affine form dlib itself uses at inference.
        scale = params[:half] / np.sqrt(running_vars + eps)
        p["gamma"] = scale.astype(np.float32)
        p["beta"] = (params[half:] - scale * running_means).astype(np.float32)
        tag = "affine_"
    elif tag == "relu_" or tag == "add_prev_":
        pass
    elif tag in ("max_pool_2", "avg_pool_2"):
        p["kh"], p["kw"] = s.integer(), s.integer()
        p["stride"] = (s.integer(), s.integer())
        p["padding"] = (s.integer(), s.integer())
    elif tag == "fc_2":
        p["num_outputs"] = s.integer()
        p["num_inputs"] = s.integer()
        params = s.tensor().reshape(-1)
        s.alias_tensor()
        s.alias_tensor()
        p["bias_mode"] = s.integer()
        s.reals(4)
        n_w = p["num_inputs"] * p["num_outputs"]
        p["weight"] = params[:n_w].reshape(p["num_inputs"], p["num_outputs"]).copy()
        if p["bias_mode"] != 1:
            p["bias"] = params[n_w : n_w + p["num_outputs"]].copy()
    else:
        raise s._fail(f"unsupported layer record {tag!r}")
    return Layer(tag, p)


def _read_trailer(s: Stream, input_adjacent: bool) -> None:
    for _ in range(3):
        s.boolean()
    s.tensor()  # x_grad
    s.tensor()  # cached_output
    s.tensor()  # params_grad, or grad_final for the input-adjacent wrapper
    if input_adjacent:
        s.integer()  # sample_expansion_factor


@dataclass
class DlibNet:
    """A parsed dlib DNN: the loss record, the input record and the layers."""

    loss: dict[str, Any]
    input: dict[str, Any]
    layers: list[Layer]
    wrapper_versions: list[int]


def _read_loss(s: Stream) -> dict[str, Any]:
    tag = s.string()
    if tag == "loss_metric_2":
        return {"kind": tag, "margin": s.real(), "distance_threshold": s.real()}
    if tag == "loss_mmod_":
        version = s.integer()
        if version != 1:
            raise s._fail(f"unsupported mmod_options version {version}")
        width, height = s.integer(), s.integer()
        opts: dict[str, Any] = {"kind": tag, "window": (width, height)}
        opts["loss_per_false_alarm"] = s.real()
        opts["loss_per_missed_target"] = s.real()
        opts["truth_match_iou_threshold"] = s.real()
        opts["nms_iou"] = s.real()
        opts["nms_covered"] = s.real()
        opts["ignore_iou"] = s.real()
        opts["ignore_covered"] = s.real()
        return opts
    raise s._fail(f"unsupported loss record {tag!r}")


def _read_input(s: Stream) -> dict[str, Any]:
    tag = s.string()
    if tag == "input_rgb_image_sized":
        mean = (s.real(), s.real(), s.real())
        size = (s.integer(), s.integer())
        return {"kind": tag, "mean_rgb": mean, "size": size}
    if tag == "input_rgb_image_pyramid":
        mean = (s.real(), s.real(), s.real())
        return {"kind": tag, "mean_rgb": mean, "padding": 10, "outer_padding": 11}
    raise s._fail(f"unsupported input record {tag!r}")


def read_net(data: bytes) -> DlibNet:
    """Parse a dlib ``add_loss_layer`` network stream.

    Raises:
        DlibFormatError: the bytes are not such a stream, or use records this
            reader does not implement.
    """
    s = Stream(data)
    if s.integer() != 1:
        raise s._fail("expected loss wrapper version 1")
    loss = _read_loss(s)
    versions: list[int] = []
    while True:
        v = s.integer()
        if v not in (1, 2, 3):
            raise s._fail(f"unexpected wrapper version {v}")
        versions.append(v)
        if v == 3:
            break
        if len(versions) > 10_000:
            raise s._fail("no input-adjacent wrapper found")
    net_input = _read_input(s)
    n_real = sum(1 for v in versions if v in (2, 3))
    layers: list[Layer] = []
    for i in range(n_real):
        layers.append(_read_layer(s))
        _read_trailer(s, input_adjacent=(i == 0))
    if not s.at_end():
        raise s._fail("trailing bytes after the last layer")
    return DlibNet(loss, net_input, layers, versions)


@dataclass
class ShapePredictor:
    """dlib's ensemble-of-regression-trees landmark predictor, as arrays.

    Shapes (C cascades, T trees, S splits, L leaves, F features, P points):
    ``initial_shape`` (P, 2); ``split_idx`` (C, T, S, 2) int; ``split_thresh``
    (C, T, S); ``leaves`` (C, T, L, P, 2); ``anchor_idx`` (C, F) int;
    ``deltas`` (C, F, 2).
    """

    initial_shape: np.ndarray
    split_idx: np.ndarray
    split_thresh: np.ndarray
    leaves: np.ndarray
    anchor_idx: np.ndarray
    deltas: np.ndarray


def read_shape_predictor(data: bytes) -> ShapePredictor:
    """Parse a ``shape_predictor`` stream (e.g. the 5-point landmark model)."""
    s = Stream(data)
    version = s.integer()
    if version != 1:
        raise s._fail(f"unsupported shape_predictor version {version}")
    initial = s.float_matrix().reshape(-1, 2)
    n_points = initial.shape[0]
    n_cascades = s.integer()
    split_idx: list[list[list[tuple[int, int]]]] = []
    split_thr: list[list[list[float]]] = []
    leaves: list[np.ndarray] = []
    for _ in range(n_cascades):
        n_trees = s.integer()
        c_idx, c_thr, c_leaves = [], [], []
        for _ in range(n_trees):
            n_splits = s.integer()
            t_idx, t_thr = [], []
            for _ in range(n_splits):
                t_idx.append((s.integer(), s.integer()))
                t_thr.append(s.real())
            n_leaves = s.integer()
            if n_leaves != n_splits + 1:
                raise s._fail("tree is not complete")
            t_leaves = np.stack([s.float_matrix().reshape(n_points, 2) for _ in range(n_leaves)])
            c_idx.append(t_idx)
            c_thr.append(t_thr)
            c_leaves.append(t_leaves)
        split_idx.append(c_idx)
        split_thr.append(c_thr)
        leaves.append(np.stack(c_leaves))
    anchors = [[s.integer() for _ in range(s.integer())] for _ in range(s.integer())]
    deltas = []
    for _ in range(s.integer()):
        deltas.append([(s.real(), s.real()) for _ in range(s.integer())])
    if not s.at_end():
        raise s._fail("trailing bytes after the shape predictor")
    return ShapePredictor(
        initial_shape=initial.astype(np.float32),
        split_idx=np.asarray(split_idx, dtype=np.int32),
        split_thresh=np.asarray(split_thr, dtype=np.float32),
        leaves=np.stack(leaves).astype(np.float32),
        anchor_idx=np.asarray(anchors, dtype=np.int32),
        deltas=np.asarray(deltas, dtype=np.float32),
    )
