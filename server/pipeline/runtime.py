"""onnxruntime sessions on the execution provider the configuration asks for."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from server.errors import ConfigurationError

log = logging.getLogger(__name__)

# Configuration name -> onnxruntime provider chain, most preferred first.  The
# CPU provider always ends a chain: onnxruntime places nodes a GPU provider
# cannot run there.  The chosen *primary* provider must be available.
PROVIDERS: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _cuda_works() -> bool:
    """Whether a CUDA session really runs here: onnxruntime-gpu lists its CUDA
    provider on any machine, GPU or not, and falls back to the CPU at session
    creation when there is no device or library."""
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls(directory="")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    try:
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=PROVIDERS["cuda"])
    except Exception as exc:  # onnxruntime raises its own exception types
        log.warning("the CUDA provider is installed but does not start (%s): using the CPU",
                    str(exc).splitlines()[0][:200])
        return False
    if session.get_providers()[0] != "CUDAExecutionProvider":
        log.warning("the CUDA provider is installed but found no usable GPU: using the CPU")
        return False
    return True


def resolve_provider(requested: str) -> str:
    """Map ``auto`` to CUDA where a CUDA session really runs, else the CPU; check
    that any other name exists.

    Raises:
        ConfigurationError: an unknown name, or a GPU provider that this
            onnxruntime build or machine does not have (never a silent fallback).
    """
    available = set(ort.get_available_providers())
    if requested == "auto":
        requested = "cuda" if "CUDAExecutionProvider" in available and _cuda_works() else "cpu"
    if requested not in PROVIDERS:
        raise ConfigurationError(f"unknown execution provider {requested!r}; "
                                 f"choose one of auto, {', '.join(PROVIDERS)}")
    primary = PROVIDERS[requested][0]
    if primary not in available:
        raise ConfigurationError(
            f"execution provider {requested!r} requested but {primary} is not available "
            f"(available: {', '.join(sorted(available))}); install onnxruntime-gpu and the "
            "CUDA libraries, or set the provider to cpu")
    if requested != "cpu" and hasattr(ort, "preload_dlls"):
        # CUDA and cuDNN from NVIDIA's wheels (onnxruntime-gpu[cuda,cudnn]) where
        # installed, else the system's: no LD_LIBRARY_PATH needed (onnxruntime >= 1.21).
        ort.preload_dlls(directory="")
    return requested


def fixed_batch(session: ort.InferenceSession) -> int | None:
    """The batch size a model was exported with, or None if its batch axis is dynamic."""
    first = session.get_inputs()[0].shape[0]
    return first if isinstance(first, int) else None


def run_batched(session: ort.InferenceSession, name: str, x: np.ndarray,
                limit: int | None, outputs: list[str] | None = None) -> list[np.ndarray]:
    """``session.run`` of ``outputs`` (default: all) on ``x``; for a model exported with
    a fixed batch of ``limit``, in slices of that size, the last one padded (by
    repeating its last item) and the padding's outputs dropped."""
    if limit is None or len(x) == limit:
        return list(session.run(outputs, {name: x}))
    parts = []
    for i in range(0, len(x), limit):
        part = x[i:i + limit]
        short = limit - len(part)
        if short:
            part = np.concatenate([part, np.repeat(part[-1:], short, axis=0)])
        out = session.run(outputs, {name: part})
        parts.append([o[:limit - short] for o in out])
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def make_session(path: Path, provider: str, intra_op_threads: int,
                 cudnn_conv_algo_search: str = "HEURISTIC") -> ort.InferenceSession:
    """An inference session for ``path`` on ``provider`` (already resolved).

    On CUDA, ``cudnn_conv_algo_search`` picks how cuDNN chooses convolution
    algorithms: onnxruntime's default, EXHAUSTIVE, benchmarks every algorithm for
    every new input shape, which stalls the first batches of each size.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads > 0:
        opts.intra_op_num_threads = intra_op_threads
    providers: list[str | tuple[str, dict[str, str]]] = list(PROVIDERS[provider])
    if provider in ("cuda", "tensorrt"):
        at = providers.index("CUDAExecutionProvider")
        providers[at] = ("CUDAExecutionProvider",
                         {"cudnn_conv_algo_search": cudnn_conv_algo_search})
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    used = session.get_providers()[0]
    if used != PROVIDERS[provider][0]:
        raise ConfigurationError(f"{path.name}: onnxruntime fell back to {used} "
                                 f"although {provider} was requested")
    log.debug("loaded %s on %s", path.name, used)
    return session
