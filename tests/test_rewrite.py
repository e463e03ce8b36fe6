"""PReLU rewrites: the outputs kept, the convolution form where the slopes are constants."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from server.errors import ModelError
from server.models.rewrite import prelu_as_conv, prelu_as_relu, same_outputs


def _chain(slopes: list[np.ndarray], free_slope: bool = False) -> onnx.ModelProto:
    """x -> PRelu -> PRelu -> ... with the given slopes (3 values: per channel, as
    ``[3, 1, 1]``; else as shaped); with ``free_slope`` the last node's slope is an
    input of the graph."""
    nodes, inits, prev = [], [], "x"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])]
    for i, a in enumerate(slopes):
        a = a.reshape(3, 1, 1) if a.shape == (3,) else a
        inits.append(numpy_helper.from_array(a.astype(np.float32), f"a{i}"))
        nodes.append(helper.make_node("PRelu", [prev, f"a{i}"], [f"y{i}"]))
        prev = f"y{i}"
    if free_slope:
        inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [3, 1, 1]))
        nodes.append(helper.make_node("PRelu", [prev, "s"], ["z"]))
        prev = "z"
    graph = helper.make_graph(
        nodes, "chain", inputs,
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["n", 3, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(s.run(None, {"x": x})[0])


def test_the_conv_form_has_no_prelu_and_keeps_its_values() -> None:
    model = _chain([np.array([-0.81, 0.0, 0.3]), np.array([1.0, 1.12, 3.0]),
                    np.array([0.2, 1.5, -0.4])])
    rewritten = prelu_as_conv(model)
    ops = [n.op_type for n in rewritten.graph.node]
    assert "PRelu" not in ops and "Neg" not in ops and "Mul" not in ops
    assert ops.count("Conv") == 6 and ops.count("Add") == 3
    assert same_outputs(model, rewritten, "chain") <= 1e-6
    # Beyond same_outputs' random input: zeros, huge values of both signs (a slope
    # of 3 takes -3e38 to -inf in both), ordinary values.
    x = np.concatenate([np.zeros(48), np.full(48, 3e38), np.full(48, -3e38),
                        np.random.default_rng(1).normal(0, 100, 48)]).astype(np.float32)
    x = x.reshape(1, 3, 8, 8)
    assert np.array_equal(_run(model, x), _run(rewritten, x))


def test_one_slope_is_leaky_relu_and_other_slopes_keep_the_relu_form() -> None:
    # One slope for all; one per column (a [8] slope broadcasts along W, not C); an
    # input of the graph.
    model = _chain([np.array([0.25]), np.linspace(-1, 2, 8)], free_slope=True)
    rewritten = prelu_as_conv(model)
    ops = [n.op_type for n in rewritten.graph.node]
    relu = ["Relu", "Neg", "Relu", "Mul", "Sub"]
    assert ops == ["LeakyRelu", *relu, *relu]
    x = np.random.default_rng(2).normal(0, 10, (2, 3, 8, 8)).astype(np.float32)
    s = np.array([0.5, -0.5, 1.5], np.float32).reshape(3, 1, 1)
    before, after = (ort.InferenceSession(m.SerializeToString(),
                                          providers=["CPUExecutionProvider"])
                     for m in (model, rewritten))
    assert np.array_equal(before.run(None, {"x": x, "s": s})[0],
                          after.run(None, {"x": x, "s": s})[0])


def test_the_relu_form_keeps_the_outputs_and_a_changed_graph_is_refused() -> None:
    model = _chain([np.array([-0.5, 0.25, 2.0])])
    relu = prelu_as_relu(model)
    assert [n.op_type for n in relu.graph.node] == ["Relu", "Neg", "Relu", "Mul", "Sub"]
    assert same_outputs(model, relu, "chain") == 0.0
    broken = prelu_as_conv(model)
    next(n for n in broken.graph.node if n.op_type == "Add").op_type = "Sub"
    with pytest.raises(ModelError, match="outputs differ"):
        same_outputs(model, broken, "chain")
