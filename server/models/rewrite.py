"""Rewrites of an ONNX graph that keep its outputs, checked by running both.

``prelu_as_relu``: each ``PRelu(x, slope)`` becomes ``Relu(x) - slope * Relu(-x)``.
Where x > 0 the second term is exactly 0, where x < 0 the first is, and
negation is exact.  onnxruntime runs PReLU slower than Relu, Neg, Mul and Sub
together (Intel's re-identification recognizer: 12.0 instead of 16.2 ms a face on
one Intel Xeon core, benchmarks.recognizer_graphs).

``prelu_as_conv``: the same sum with its factors as 1x1 depthwise
convolutions, ``Relu(x) + Conv[-slope](Relu(Conv[-1](x)))``, for a per-channel
constant slope.  On the CPU, onnxruntime runs convolutions, Relu and Add in its
blocked (NCHWc) layout, and moves every other element-wise op's tensors out of
that layout and back: with Neg, Mul and Sub, SFace spent a third of its time
moving tensors (54 reorders a face); written as convolutions it spends none.
The values are those of PReLU (each factor is exact or one rounding of
``slope * x``), but the convolutions around them may then run other kernels
that add in another order, so the outputs can differ by float rounding
(2.2e-7 of the largest for SFace), hence the tolerance of :func:`same_outputs`.
A single slope for every channel is ``LeakyRelu``, which onnxruntime fuses
into the convolution before it; a slope that is neither keeps the Relu form.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from server.errors import ModelError

# The largest change a rewrite may make, relative to the largest output: float
# rounding in another order (the repairs of the shipped files allow 1e-4).
REWRITE_TOLERANCE = 1e-5


def _relu_form(x: str, slope: str, out: list[str], name: str) -> list[onnx.NodeProto]:
    return [helper.make_node("Relu", [x], [f"{name}_pos"]),
            helper.make_node("Neg", [x], [f"{name}_negx"]),
            helper.make_node("Relu", [f"{name}_negx"], [f"{name}_neg"]),
            helper.make_node("Mul", [slope, f"{name}_neg"], [f"{name}_scaled"]),
            helper.make_node("Sub", [f"{name}_pos", f"{name}_scaled"], out)]


def _channel_slopes(init: onnx.TensorProto | None) -> np.ndarray | None:
    """The slopes of a constant of one slope per channel (``[C, 1, 1]`` or
    ``[1, C, 1, 1]`` against NCHW) or one for all (a single value), else None."""
    if init is None:
        return None
    a = numpy_helper.to_array(init)
    per_channel = a.ndim in (3, 4) and a.shape[-2:] == (1, 1) and a.size == a.shape[-3]
    return a.reshape(-1) if per_channel or a.size == 1 else None


def _conv_form(x: str, slopes: np.ndarray, out: list[str], name: str,
               graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    c = slopes.size
    weights = ((f"{name}_minus_one", np.full(c, -1.0)), (f"{name}_minus_slope", -slopes))
    for weight, values in weights:
        graph.initializer.append(numpy_helper.from_array(
            values.astype(np.float32).reshape(c, 1, 1, 1), weight))
    return [helper.make_node("Relu", [x], [f"{name}_pos"]),
            helper.make_node("Conv", [x, f"{name}_minus_one"], [f"{name}_negx"], group=c,
                             kernel_shape=[1, 1]),
            helper.make_node("Relu", [f"{name}_negx"], [f"{name}_neg"]),
            helper.make_node("Conv", [f"{name}_neg", f"{name}_minus_slope"], [f"{name}_scaled"],
                             group=c, kernel_shape=[1, 1]),
            helper.make_node("Add", [f"{name}_pos", f"{name}_scaled"], out)]


def _rewritten(model: onnx.ModelProto, convs: bool) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    constants = {i.name: i for i in out.graph.initializer}
    nodes = []
    for i, node in enumerate(out.graph.node):
        if node.op_type != "PRelu":
            nodes.append(node)
            continue
        x, slope = node.input
        name = f"prelu_{i}"
        slopes = _channel_slopes(constants.get(slope)) if convs else None
        if slopes is None:
            nodes += _relu_form(x, slope, list(node.output), name)
        elif slopes.size == 1:  # one slope for every channel: LeakyRelu, fused by onnxruntime
            nodes.append(helper.make_node("LeakyRelu", [x], list(node.output),
                                          alpha=float(slopes[0])))
        else:
            nodes += _conv_form(x, slopes, list(node.output), name, out.graph)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    read = {name for node in nodes for name in node.input}
    unread = [i for i in out.graph.initializer if i.name not in read]
    for init in unread:  # the slopes now held by the convolutions' weights
        out.graph.initializer.remove(init)
    return out


def prelu_as_relu(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every PRelu node written with Relu (see above)."""
    return _rewritten(model, convs=False)


def prelu_as_conv(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every PRelu node of per-channel constant slopes written
    with Relu and depthwise convolutions, of one constant slope as LeakyRelu, any
    other with Relu (see above)."""
    return _rewritten(model, convs=True)


PRELU_REWRITES: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "relu": prelu_as_relu, "conv": prelu_as_conv}


def same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, name: str,
                 batch: int = 2) -> float:
    """Run both models on the same random input; refuse a difference over
    :data:`REWRITE_TOLERANCE` of the largest output.

    Returns:
        the largest difference, relative to the largest output.

    Raises:
        ModelError: the outputs differ more (names the model and the difference).
    """
    rng = np.random.default_rng(0)
    results = []
    for model in (before, after):
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        shape = [batch if not isinstance(d, int) else d for d in inp.shape]
        # Both signs: a graph's first PReLU sees its input as it is.
        x = rng.uniform(-255, 255, shape).astype(np.float32)
        rng = np.random.default_rng(0)  # the same input for both
        results.append(session.run(None, {inp.name: x})[0])
    worst = float(np.abs(results[0] - results[1]).max() / max(np.abs(results[0]).max(), 1e-30))
    if not worst <= REWRITE_TOLERANCE:
        raise ModelError(f"{name}: the rewritten model's outputs differ by up to {worst:.3g} "
                         "of the largest; build it with --prelu keep")
    return worst
