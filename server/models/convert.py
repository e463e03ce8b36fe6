"""Convert dlib networks, parsed by :mod:`server.models.dlib_format`, to ONNX.

The ResNet topology (where the residual shortcuts go) is not stored in the
file; it is the ``anet_type`` of dlib's ``dnn_face_recognition_ex.cpp``.  The
record sequence read from the file is checked against that topology as it is
consumed, so a different file fails with a clear error rather than a wrong
graph.  ``affine_`` layers are folded into the preceding convolution.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from server.models.dlib_format import DlibFormatError, DlibNet, Layer

OPSET = 17


def portable(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give the model the lowest IR version its opsets need, and return it.

    onnx writes its own newest IR version by default, which older onnxruntime
    builds refuse ("Unsupported model IR version") even when they run every op
    in the model: the IR version an opset needs is what they can check against.
    """
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import),
                                                      ignore_unknown=True)
    return model


class Graph:
    """A small ONNX graph builder with unique names and initialisers."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def const(self, prefix: str, value: np.ndarray) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        out = out or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def conv(self, x: str, conv: Layer, affine: Layer | None, out: str | None = None) -> str:
        w = conv.params["weight"]
        b = conv.params["bias"]
        if affine is not None:
            gamma, beta = affine.params["gamma"], affine.params["beta"]
            w = w * gamma[:, None, None, None]
            b = b * gamma + beta
        py, px = conv.params["padding"]
        return self.op(
            "Conv",
            [x, self.const("w", w.astype(np.float32)), self.const("b", b.astype(np.float32))],
            out,
            kernel_shape=[conv.params["kh"], conv.params["kw"]],
            strides=list(conv.params["stride"]),
            pads=[py, px, py, px],
        )

    def model(self, inputs: list[onnx.ValueInfoProto], output: str,
              out_shape: list[str | int | None],
              doc: str) -> onnx.ModelProto:
        return self.finish("graph", inputs,
                           [helper.make_tensor_value_info(output, TensorProto.FLOAT, out_shape)],
                           doc)

    def finish(self, name: str, inputs: list[onnx.ValueInfoProto],
               outputs: list[onnx.ValueInfoProto], doc: str) -> onnx.ModelProto:
        """The checked model of this graph, with the IR version its opset needs."""
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="faceverify")
        m.doc_string = doc
        portable(m)
        onnx.checker.check_model(m)
        return m


class _Records:
    """Consumes layer records in order, checking each one's kind."""

    def __init__(self, layers: list[Layer]) -> None:
        self._it: Iterator[Layer] = iter(layers)
        self.index = -1

    def take(self, kind: str) -> Layer:
        self.index += 1
        layer = next(self._it, None)
        if layer is None or layer.kind != kind:
            got = layer.kind if layer else "end of network"
            raise DlibFormatError(f"layer {self.index}: expected {kind}, found {got}")
        return layer

    def done(self) -> None:
        if next(self._it, None) is not None:
            raise DlibFormatError("the network has more layers than the expected topology")


def _conv_out(size: int, k: int, stride: int, pad: int) -> int:
    return 1 + (size + 2 * pad - k) // stride


def resnet_to_onnx(net: DlibNet) -> onnx.ModelProto:
    """Build the face-descriptor ResNet as ONNX.

    Input ``chips``: float32 [N, 3, 150, 150], RGB planes, pixel values 0-255.
    Output ``embeddings``: float32 [N, 128], dlib's raw descriptor.
    """
    if net.input["kind"] != "input_rgb_image_sized":
        raise DlibFormatError("not a face-descriptor network: wrong input layer")
    size = net.input["size"][0]
    g = Graph()
    recs = _Records(net.layers)
    mean = np.asarray(net.input["mean_rgb"], dtype=np.float32).reshape(1, 3, 1, 1)
    x = g.op("Sub", ["chips", g.const("mean", mean)])
    x = g.op("Mul", [x, g.const("scale", np.asarray(1.0 / 256.0, dtype=np.float32))])

    stem = recs.take("con_4")
    x = g.conv(x, stem, recs.take("affine_"))
    x = g.op("Relu", [x])
    recs.take("relu_")
    hw = _conv_out(size, stem.params["kh"], stem.params["stride"][0], stem.params["padding"][0])
    pool = recs.take("max_pool_2")
    x = g.op("MaxPool", [x], kernel_shape=[pool.params["kh"], pool.params["kw"]],
             strides=list(pool.params["stride"]), pads=[pool.params["padding"][0]] * 4)
    hw = _conv_out(hw, pool.params["kh"], pool.params["stride"][0], pool.params["padding"][0])
    channels = stem.params["num_filters"]

    # (filters, downsampling) per block, input to output: alevel4 .. alevel0.
    blocks = [(32, False)] * 3 + [(64, True)] + [(64, False)] * 3 + [(128, True)] + \
        [(128, False)] * 2 + [(256, True)] + [(256, False)] * 2 + [(256, True)]
    for filters, down in blocks:
        shortcut = x
        c1 = recs.take("con_4")
        if c1.params["num_filters"] != filters or (c1.params["stride"][0] == 2) != down:
            raise DlibFormatError(f"layer {recs.index}: block shape differs from dlib's ResNet")
        y = g.op("Relu", [g.conv(x, c1, recs.take("affine_"))])
        recs.take("relu_")
        y = g.conv(y, recs.take("con_4"), recs.take("affine_"))
        if down:
            p = recs.take("avg_pool_2")
            shortcut = g.op("AveragePool", [shortcut],
                            kernel_shape=[p.params["kh"], p.params["kw"]],
                            strides=list(p.params["stride"]), pads=[p.params["padding"][0]] * 4)
            pooled_hw = _conv_out(hw, p.params["kh"], p.params["stride"][0], p.params["padding"][0])
            conv_hw = _conv_out(hw, 3, 2, 0)
            # dlib's add_prev sums tensors of unequal shape as if the smaller were
            # zero-padded at the end of each dimension.
            if conv_hw < pooled_hw:
                extra = pooled_hw - conv_hw
                pads = np.asarray([0, 0, 0, 0, 0, 0, extra, extra], dtype=np.int64)
                y = g.op("Pad", [y, g.const("pads", pads)])
            if filters > channels:
                pads = np.asarray([0, 0, 0, 0, 0, filters - channels, 0, 0], dtype=np.int64)
                shortcut = g.op("Pad", [shortcut, g.const("pads", pads)])
            hw = pooled_hw
            channels = filters
        recs.take("add_prev_")
        x = g.op("Relu", [g.op("Add", [y, shortcut])])
        recs.take("relu_")

    gap = recs.take("avg_pool_2")
    if gap.params["kh"] != 0:
        raise DlibFormatError("expected a global average pool before the descriptor layer")
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    fc = recs.take("fc_2")
    recs.done()
    g.op("MatMul", [x, g.const("fc", fc.params["weight"].astype(np.float32))], "embeddings")
    inp = helper.make_tensor_value_info("chips", TensorProto.FLOAT, ["N", 3, size, size])
    dim = fc.params["num_outputs"]
    doc = "dlib face-recognition ResNet v1 (face_recognition_models), converted by faceverify"
    return g.model([inp], "embeddings", ["N", dim], doc)


def mmod_to_onnx(net: DlibNet) -> onnx.ModelProto:
    """Build the MMOD face detector's fully convolutional scorer as ONNX.

    Input ``canvas``: float32 [N, 3, H, W], the tiled image pyramid already
    normalised as ``(pixel - mean) / 256`` (0 in the gaps).
    Output ``scores``: float32 [N, 1, H', W'], one detection score per cell.
    """
    if net.input["kind"] != "input_rgb_image_pyramid" or net.loss["kind"] != "loss_mmod_":
        raise DlibFormatError("not an MMOD detector network")
    g = Graph()
    recs = _Records(net.layers)
    x = "canvas"
    for _ in range(6):
        x = g.op("Relu", [g.conv(x, recs.take("con_4"), recs.take("affine_"))])
        recs.take("relu_")
    g.conv(x, recs.take("con_4"), None, "scores")
    recs.done()
    inp = helper.make_tensor_value_info("canvas", TensorProto.FLOAT, ["N", 3, "H", "W"])
    return g.model([inp], "scores", ["N", 1, "h", "w"],
                   "dlib MMOD CNN face detector (face_recognition_models), converted by faceverify")

