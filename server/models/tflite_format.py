"""A reader for TensorFlow Lite model files (FlatBuffers), enough to convert them.

A ``.tflite`` file is one FlatBuffer whose root table is ``Model`` of
TensorFlow's ``schema.fbs``.  FlatBuffers are read in place: a table starts
with a signed offset back to its *vtable*, a list of 16-bit field offsets
(0: field absent, take the schema default); references to tables, vectors and
strings are unsigned 32-bit offsets from where they are stored; a vector is a
32-bit length followed by its elements.  Only the parts of the schema that a
converter needs are read: tensors (shape, type, data), operators (builtin
code, inputs, outputs, options), the subgraph's inputs and outputs.

Raises :class:`TfliteFormatError` on anything malformed or unsupported, naming
what was wrong; never returns half-read data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class TfliteFormatError(ValueError):
    """The bytes are not a TensorFlow Lite model this reader understands."""


# schema.fbs enum BuiltinOperator: the codes this project's converter knows.
BUILTIN_OPS = {
    0: "ADD", 1: "AVERAGE_POOL_2D", 2: "CONCATENATION", 3: "CONV_2D",
    4: "DEPTHWISE_CONV_2D", 6: "DEQUANTIZE", 14: "LOGISTIC", 17: "MAX_POOL_2D",
    18: "MUL", 19: "RELU", 21: "RELU6", 22: "RESHAPE", 23: "RESIZE_BILINEAR", 34: "PAD",
    54: "PRELU",
}

# schema.fbs enum TensorType -> numpy dtype.
TENSOR_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64,
                9: np.int8}

# Field indices (in declaration order) of each options table this reader
# decodes, with each field's scalar format and schema default.
_OPTIONS: dict[str, list[tuple[str, str, int]]] = {
    "CONV_2D": [("padding", "b", 0), ("stride_w", "i", 0), ("stride_h", "i", 0),
                ("activation", "b", 0), ("dilation_w", "i", 1), ("dilation_h", "i", 1)],
    "DEPTHWISE_CONV_2D": [("padding", "b", 0), ("stride_w", "i", 0), ("stride_h", "i", 0),
                          ("depth_multiplier", "i", 0), ("activation", "b", 0),
                          ("dilation_w", "i", 1), ("dilation_h", "i", 1)],
    "MAX_POOL_2D": [("padding", "b", 0), ("stride_w", "i", 0), ("stride_h", "i", 0),
                    ("filter_w", "i", 0), ("filter_h", "i", 0), ("activation", "b", 0)],
    "AVERAGE_POOL_2D": [("padding", "b", 0), ("stride_w", "i", 0), ("stride_h", "i", 0),
                        ("filter_w", "i", 0), ("filter_h", "i", 0), ("activation", "b", 0)],
    "ADD": [("activation", "b", 0)],
    "MUL": [("activation", "b", 0)],
    "CONCATENATION": [("axis", "i", 0), ("activation", "b", 0)],
    "RESIZE_BILINEAR": [("new_height", "i", 0), ("new_width", "i", 0),
                        ("align_corners", "b", 0), ("half_pixel_centers", "b", 0)],
}

# schema.fbs enum ActivationFunctionType and Padding.
ACTIVATIONS = {0: None, 1: "RELU", 3: "RELU6"}
PADDINGS = {0: "SAME", 1: "VALID"}


@dataclass
class Tensor:
    """One tensor of the graph: a constant when ``data`` is set."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: type
    data: np.ndarray | None


@dataclass
class Operator:
    """One node: its builtin op name, tensor indices and decoded options."""

    op: str
    inputs: list[int]
    outputs: list[int]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TfliteModel:
    """The first subgraph of a model: what a converter walks in order."""

    tensors: list[Tensor]
    operators: list[Operator]
    inputs: list[int]
    outputs: list[int]
    version: int


class _Reader:
    """FlatBuffer primitives over one buffer, with bounds checks."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf

    def _unpack(self, fmt: str, pos: int) -> Any:
        size = struct.calcsize("<" + fmt)
        if pos < 0 or pos + size > len(self.buf):
            raise TfliteFormatError(f"offset {pos} points outside the {len(self.buf)}-byte file")
        return struct.unpack_from("<" + fmt, self.buf, pos)[0]

    def deref(self, pos: int) -> int:
        """The position an unsigned offset stored at ``pos`` points to."""
        return pos + int(self._unpack("I", pos))

    def field_pos(self, table: int, index: int) -> int | None:
        """Where field ``index`` of the table at ``table`` is stored, or None if absent."""
        vtable = table - int(self._unpack("i", table))
        vt_size = int(self._unpack("H", vtable))
        slot = 4 + 2 * index
        if slot + 2 > vt_size:
            return None
        off = int(self._unpack("H", vtable + slot))
        return table + off if off else None

    def scalar(self, table: int, index: int, fmt: str, default: int) -> int:
        pos = self.field_pos(table, index)
        return default if pos is None else int(self._unpack(fmt, pos))

    def table(self, table: int, index: int) -> int | None:
        pos = self.field_pos(table, index)
        return None if pos is None else self.deref(pos)

    def vector(self, table: int, index: int) -> tuple[int, int]:
        """(position of the first element, length); (0, 0) if absent."""
        pos = self.field_pos(table, index)
        if pos is None:
            return 0, 0
        start = self.deref(pos)
        return start + 4, int(self._unpack("I", start))

    def ints(self, table: int, index: int) -> list[int]:
        start, n = self.vector(table, index)
        if start + 4 * n > len(self.buf):
            raise TfliteFormatError("an int vector runs past the end of the file")
        return list(struct.unpack_from(f"<{n}i", self.buf, start)) if n else []

    def tables(self, table: int, index: int) -> list[int]:
        start, n = self.vector(table, index)
        return [self.deref(start + 4 * i) for i in range(n)]

    def string(self, table: int, index: int) -> str:
        start, n = self.vector(table, index)
        return self.buf[start:start + n].decode("utf-8", "replace") if n else ""

    def blob(self, table: int, index: int) -> bytes:
        start, n = self.vector(table, index)
        if start + n > len(self.buf):
            raise TfliteFormatError("a data buffer runs past the end of the file")
        return self.buf[start:start + n]


def read_tflite(buf: bytes) -> TfliteModel:
    """Parse a ``.tflite`` model (its first subgraph).

    Raises:
        TfliteFormatError: not a TFLite FlatBuffer, several subgraphs' worth of
            control flow, an operator outside :data:`BUILTIN_OPS`, or
            inconsistent offsets.
    """
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise TfliteFormatError("not a TensorFlow Lite model (no TFL3 identifier)")
    r = _Reader(buf)
    model = r.deref(0)
    version = r.scalar(model, 0, "I", 0)
    if version != 3:
        raise TfliteFormatError(f"TFLite schema version {version}; this reader knows version 3")
    opcodes = []
    for oc in r.tables(model, 1):
        # builtin_code (field 3) supersedes the byte-sized deprecated_builtin_code (field 0)
        code = max(r.scalar(oc, 0, "b", 0), r.scalar(oc, 3, "i", 0))
        opcodes.append(code)
    buffers = [r.blob(b, 0) for b in r.tables(model, 4)]
    subgraphs = r.tables(model, 2)
    if not subgraphs:
        raise TfliteFormatError("the model has no subgraph")
    sg = subgraphs[0]

    tensors = []
    for i, t in enumerate(r.tables(sg, 0)):
        shape = tuple(r.ints(t, 0))
        type_code = r.scalar(t, 1, "b", 0)
        if type_code not in TENSOR_TYPES:
            raise TfliteFormatError(f"tensor {i} has unsupported type code {type_code}")
        dtype = TENSOR_TYPES[type_code]
        buffer_index = r.scalar(t, 2, "I", 0)
        if buffer_index >= len(buffers):
            raise TfliteFormatError(f"tensor {i} names buffer {buffer_index} of {len(buffers)}")
        raw = buffers[buffer_index]
        data = None
        if raw:
            count = int(np.prod(shape)) if shape else 1
            if len(raw) != count * np.dtype(dtype).itemsize:
                raise TfliteFormatError(f"tensor {i} ({r.string(t, 3)}): {len(raw)} bytes of "
                                        f"data for shape {shape} of {np.dtype(dtype).name}")
            data = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        tensors.append(Tensor(i, r.string(t, 3), shape, dtype, data))

    operators = []
    for k, o in enumerate(r.tables(sg, 3)):
        idx = r.scalar(o, 0, "I", 0)
        if idx >= len(opcodes):
            raise TfliteFormatError(f"operator {k} names opcode {idx} of {len(opcodes)}")
        code = opcodes[idx]
        if code not in BUILTIN_OPS:
            raise TfliteFormatError(f"operator {k} is builtin code {code}, which this "
                                    "converter does not support")
        op = BUILTIN_OPS[code]
        options: dict[str, Any] = {}
        opts = r.table(o, 4)
        if op == "RESHAPE" and opts is not None:
            options["new_shape"] = r.ints(opts, 0)
        for j, (name, fmt, default) in enumerate(_OPTIONS.get(op, [])):
            options[name] = default if opts is None else r.scalar(opts, j, fmt, default)
        operators.append(Operator(op, r.ints(o, 1), r.ints(o, 2), options))
    return TfliteModel(tensors, operators, r.ints(sg, 1), r.ints(sg, 2), version)
