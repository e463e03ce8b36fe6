"""OpenVINO IR (``.xml`` + ``.bin``, IR v10/v11) to ONNX, by the project's own reader.

An operator may bring a recognizer that exists only as OpenVINO IR (Intel's
Apache-2.0 ``face-reidentification-retail-0095``, say).  The IR is an XML
graph of layers and edges whose constants live in the ``.bin`` file at the
byte offsets the XML gives.  Each layer becomes the ONNX op with the same
meaning; compressed (FP16) weights behind a ``Convert`` are decompressed to
FP32 here, as OpenVINO's CPU plugin does when it runs them.  The batch axis
of the input, fixed at 1 in the IR, is left free.

The op set read is what convolutional face recognizers use
(:data:`OPS`); any other op is refused, naming the layer, rather than
converted approximately.  The conversion is checked against the ``openvino``
package's own output in ``tests/test_openvino_ir.py``.

PReLU stays PReLU here; ``faceverify models build --prelu relu`` may rewrite
it afterwards (:func:`server.models.rewrite.prelu_as_relu`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from server.errors import ModelError
from server.models.convert import OPSET, Graph, portable

DTYPES = {"f32": np.float32, "f16": np.float16, "i64": np.int64, "i32": np.int32,
          "u8": np.uint8, "i8": np.int8, "boolean": np.bool_}
ELEMENTWISE = {"Add": "Add", "Multiply": "Mul", "Subtract": "Sub", "Divide": "Div"}
UNARY = {"Sigmoid": "Sigmoid", "Relu": "Relu", "Tanh": "Tanh"}
OPS = ("Parameter", "Const", "Convert", "Convolution", "GroupConvolution", "PReLU", "AvgPool",
       "MaxPool", "Clamp", "Concat", "Result", *ELEMENTWISE, *UNARY)


@dataclass
class Layer:
    """One IR layer: its ops' attributes and its ports' shapes."""

    id: str
    name: str
    type: str
    attrs: dict[str, str]
    in_shapes: dict[str, list[int]]  # port id -> dims
    out_ports: list[str]
    inputs: list[str] = field(default_factory=list)  # value names, in port order

    @property
    def first_input(self) -> list[int]:
        """The dims of the input port numbered lowest (the data, not the weights)."""
        return self.in_shapes[min(self.in_shapes, key=int)]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace(" ", "").split(",") if v]


def _dims(port: ET.Element) -> list[int]:
    return [int(d.text or "0") for d in port.findall("dim")]


def read_layers(xml_path: Path) -> tuple[list[Layer], int]:
    """The IR's layers in an order where every input comes first, and its IR version.

    Raises:
        ModelError: not an IR file, an unsupported IR version or op, or a cycle.
    """
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise ModelError(f"{xml_path.name} is not an OpenVINO IR XML file: {exc}") from exc
    version = int(root.get("version", "0"))
    if root.tag != "net" or version not in (10, 11):
        raise ModelError(f"{xml_path.name}: IR version {version} of <{root.tag}> is not read "
                         "(OpenVINO IR v10 or v11 is)")
    layers: dict[str, Layer] = {}
    for el in root.iter("layer"):
        data = el.find("data")
        inp, out = el.find("input"), el.find("output")
        layer = Layer(id=el.get("id", ""), name=el.get("name", ""), type=el.get("type", ""),
                      attrs=dict(data.attrib) if data is not None else {},
                      in_shapes={p.get("id", ""): _dims(p) for p in (inp or [])},
                      out_ports=[p.get("id", "") for p in (out or [])])
        if layer.type not in OPS:
            raise ModelError(f"{xml_path.name}: layer {layer.name!r} is a {layer.type}, which "
                             f"the IR importer does not convert (it converts {', '.join(OPS)})")
        layers[layer.id] = layer
    sources: dict[str, dict[str, str]] = {lid: {} for lid in layers}
    for edge in root.iter("edge"):
        to, frm = edge.get("to-layer", ""), edge.get("from-layer", "")
        sources[to][edge.get("to-port", "")] = f"{frm}:{edge.get('from-port')}"
    for lid, ports in sources.items():
        layers[lid].inputs = [ports[p] for p in sorted(ports, key=int)]
    ordered: list[Layer] = []
    done: set[str] = set()
    pending = list(layers.values())
    while pending:
        ready = [la for la in pending if all(v.split(":")[0] in done for v in la.inputs)]
        if not ready:
            raise ModelError(f"{xml_path.name}: the graph has a cycle or a dangling edge")
        ordered += ready
        done.update(la.id for la in ready)
        pending = [la for la in pending if la.id not in done]
    return ordered, version


def _const(layer: Layer, weights: bytes, xml_name: str) -> np.ndarray:
    a = layer.attrs
    dtype = DTYPES.get(a.get("element_type", ""))
    if dtype is None:
        raise ModelError(f"{xml_name}: constant {layer.name!r} has element type "
                         f"{a.get('element_type')!r}, which the IR importer does not read")
    offset, size = int(a["offset"]), int(a["size"])
    if offset + size > len(weights):
        raise ModelError(f"{xml_name}: constant {layer.name!r} lies beyond the end of the .bin "
                         f"file ({offset + size} > {len(weights)} bytes): wrong or truncated .bin")
    shape = _ints(a.get("shape", ""))
    return np.frombuffer(weights, dtype=dtype, count=size // np.dtype(dtype).itemsize,
                         offset=offset).reshape(shape).copy()


class _Converter:
    def __init__(self, xml_name: str, weights: bytes) -> None:
        self.g = Graph()
        self.xml_name = xml_name
        self.weights = weights
        self.consts: dict[str, np.ndarray] = {}  # values known when converting
        self.names: dict[str, str] = {}  # IR value -> ONNX name
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []

    def tensor(self, value: str) -> str:
        """The ONNX name of an IR value (constants become initialisers on first use)."""
        if value not in self.names:
            self.names[value] = self.g.const("c", self.consts[value])
        return self.names[value]

    def const_input(self, layer: Layer, index: int) -> np.ndarray:
        value = layer.inputs[index]
        if value not in self.consts:
            raise ModelError(f"{self.xml_name}: {layer.type} {layer.name!r} needs constant "
                             "weights, and its input is computed")
        return self.consts[value]

    def convert(self, layer: Layer) -> None:
        out = f"{layer.id}:{layer.out_ports[0]}" if layer.out_ports else ""
        t = layer.type
        handler: Callable[[Layer, str], None] | None = getattr(self, f"_{t.lower()}", None)
        if handler is not None:
            handler(layer, out)
        elif t in ELEMENTWISE:
            if all(v in self.consts for v in layer.inputs):
                x, y = (self.consts[v].astype(np.float32) for v in layer.inputs)
                ops = {"Add": np.add, "Multiply": np.multiply, "Subtract": np.subtract,
                       "Divide": np.divide}
                self.consts[out] = ops[t](x, y).astype(np.float32)
            else:
                self.names[out] = self.g.op(ELEMENTWISE[t], [self.tensor(v) for v in
                                                             layer.inputs])
        elif t in UNARY:
            self.names[out] = self.g.op(UNARY[t], [self.tensor(layer.inputs[0])])
        else:  # pragma: no cover - read_layers refuses every other type
            raise ModelError(f"{self.xml_name}: {t} is not converted")

    def _parameter(self, layer: Layer, out: str) -> None:
        shape: list[int | str] = list(_ints(layer.attrs["shape"]))
        if layer.attrs.get("element_type") != "f32":
            raise ModelError(f"{self.xml_name}: input {layer.name!r} is "
                             f"{layer.attrs.get('element_type')}, not f32")
        shape[0] = "N"  # the IR fixes the batch at 1
        name = layer.name or f"input_{layer.id}"
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        self.names[out] = name

    def _const(self, layer: Layer, out: str) -> None:
        self.consts[out] = _const(layer, self.weights, self.xml_name)

    def _convert(self, layer: Layer, out: str) -> None:
        target = DTYPES.get(layer.attrs.get("destination_type", ""))
        if target is None:
            raise ModelError(f"{self.xml_name}: Convert {layer.name!r} to "
                             f"{layer.attrs.get('destination_type')!r} is not converted")
        src = layer.inputs[0]
        if src in self.consts:  # decompression of stored weights
            self.consts[out] = self.consts[src].astype(target)
        else:
            to = helper.np_dtype_to_tensor_dtype(np.dtype(target))
            self.names[out] = self.g.op("Cast", [self.tensor(src)], to=to)

    def _window(self, layer: Layer) -> dict[str, Any]:
        a = layer.attrs
        pad = a.get("auto_pad", "explicit")
        if pad in ("same_upper", "same_lower"):
            return {"auto_pad": pad.upper()}
        if pad == "valid":
            return {"auto_pad": "VALID"}
        return {"pads": _ints(a.get("pads_begin", "0,0")) + _ints(a.get("pads_end", "0,0"))}

    def _convolution(self, layer: Layer, out: str) -> None:
        w = self.const_input(layer, 1).astype(np.float32)
        self.names[out] = self.g.op(
            "Conv", [self.tensor(layer.inputs[0]), self.g.const("w", w)],
            strides=_ints(layer.attrs["strides"]), dilations=_ints(layer.attrs["dilations"]),
            kernel_shape=list(w.shape[2:]), **self._window(layer))

    def _groupconvolution(self, layer: Layer, out: str) -> None:
        w = self.const_input(layer, 1).astype(np.float32)  # [G, O/G, I/G, kh, kw]
        groups = w.shape[0]
        w = w.reshape(groups * w.shape[1], *w.shape[2:])
        self.names[out] = self.g.op(
            "Conv", [self.tensor(layer.inputs[0]), self.g.const("w", w)], group=groups,
            strides=_ints(layer.attrs["strides"]), dilations=_ints(layer.attrs["dilations"]),
            kernel_shape=list(w.shape[2:]), **self._window(layer))

    def _prelu(self, layer: Layer, out: str) -> None:
        slope = self.const_input(layer, 1).astype(np.float32)
        rank = len(layer.first_input)
        if slope.size > 1 and rank > 2:  # per channel: broadcast over the spatial axes
            slope = slope.reshape(-1, *([1] * (rank - 2)))
        self.names[out] = self.g.op("PRelu", [self.tensor(layer.inputs[0]),
                                              self.g.const("slope", slope)])

    def _pool(self, layer: Layer, out: str, op: str) -> None:
        a = layer.attrs
        kernel = _ints(a["kernel"])
        spatial = layer.first_input[2:]
        window = self._window(layer)
        x = self.tensor(layer.inputs[0])
        if kernel == spatial and window.get("pads", [0]) == [0] * (2 * len(kernel)):
            self.names[out] = self.g.op(f"Global{op}", [x])  # the whole plane: same values
            return
        extra: dict[str, Any] = {}
        if op == "AveragePool":
            extra["count_include_pad"] = int(a.get("exclude-pad", "false") != "true")
        self.names[out] = self.g.op(op, [x], kernel_shape=kernel, strides=_ints(a["strides"]),
                                    ceil_mode=int(a.get("rounding_type", "floor") == "ceil"),
                                    **window, **extra)

    def _avgpool(self, layer: Layer, out: str) -> None:
        self._pool(layer, out, "AveragePool")

    def _maxpool(self, layer: Layer, out: str) -> None:
        self._pool(layer, out, "MaxPool")

    def _clamp(self, layer: Layer, out: str) -> None:
        lo = self.g.const("min", np.array(float(layer.attrs["min"]), dtype=np.float32))
        hi = self.g.const("max", np.array(float(layer.attrs["max"]), dtype=np.float32))
        self.names[out] = self.g.op("Clip", [self.tensor(layer.inputs[0]), lo, hi])

    def _concat(self, layer: Layer, out: str) -> None:
        self.names[out] = self.g.op("Concat", [self.tensor(v) for v in layer.inputs],
                                    axis=int(layer.attrs["axis"]))

    def _result(self, layer: Layer, out: str) -> None:
        name = f"output_{len(self.outputs)}"
        self.g.op("Identity", [self.tensor(layer.inputs[0])], name)
        dims = layer.first_input
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                          ["N", *dims[1:]]))


def ir_to_onnx(xml_path: Path) -> onnx.ModelProto:
    """Convert ``xml_path`` (its weights in the ``.bin`` beside it) to an ONNX model.

    Raises:
        ModelError: an unreadable file, a missing ``.bin``, or an op outside
            :data:`OPS` (named, with its layer).
    """
    bin_path = xml_path.with_suffix(".bin")
    if not bin_path.is_file():
        raise ModelError(f"{xml_path.name}: its weights {bin_path.name} are not beside it")
    layers, version = read_layers(xml_path)
    conv = _Converter(xml_path.name, bin_path.read_bytes())
    for layer in layers:
        conv.convert(layer)
    if len(conv.inputs) != 1 or not conv.outputs:
        raise ModelError(f"{xml_path.name}: {len(conv.inputs)} inputs and "
                         f"{len(conv.outputs)} outputs; a recognizer has one input")
    graph = helper.make_graph(conv.g.nodes, xml_path.stem, conv.inputs, conv.outputs,
                              conv.g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="faceverify",
                              doc_string=f"{xml_path.name} (OpenVINO IR v{version}), converted "
                                         "by faceverify")
    onnx.checker.check_model(model)
    return portable(model)
