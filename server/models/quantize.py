"""An INT8 variant of a built model set: the recognizer quantised for the CPU.

Static quantisation (QDQ, per-channel signed weights, unsigned activations)
runs on the integer dot-product units of current x86 CPUs (AVX-512 VNNI,
AMX).  Activation ranges are calibrated on aligned face chips from a folder
of face images that the operator names; nothing is downloaded.  The variant
is a new model set with its own version, so calibrations and enrolments of
the float model are never applied to it: run ``faceverify calibrate`` on it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from index.durable import replace_atomically
from server.errors import FaceVerifyError, ModelError
from server.models.calibrate import labelled_images
from server.models.convert import portable
from server.models.manifest import MANIFEST, read_manifest, sha256_file, write_json_atomic
from server.pipeline.faces import FacePipeline

log = logging.getLogger(__name__)


def calibration_chips(pipeline: FacePipeline, dataset: Path, count: int) -> np.ndarray:
    """The recognizer's input for up to ``count`` faces, spread evenly over ``dataset``."""
    paths = [p for _, p in labelled_images(dataset)]
    if not paths:
        raise ModelError(f"no images under {dataset}")
    step = max(1, len(paths) // count)
    chips = []
    for path in paths[::step][:count]:
        try:
            chips.append(pipeline.analyse(path.read_bytes(), "image", False).chip)
        except FaceVerifyError:
            continue
    if len(chips) < min(count, 16):
        raise ModelError(f"only {len(chips)} faces found under {dataset}; need at least 16")
    return pipeline.recognizer.preprocess(np.stack(chips))


def quantize_model_set(source: Path, target: Path, input_name: str,
                       recognizer_input: np.ndarray) -> dict[str, Any]:
    """Write ``target``: ``source``'s files with the recognizer quantised to INT8.

    Args:
        input_name: the recognizer's input name.
        recognizer_input: calibration inputs in the recognizer's input layout
            (see :func:`calibration_chips`).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    manifest = read_manifest(source)
    rec_file = manifest["recognizer"]["file"]

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.items: Iterator[dict[str, np.ndarray]] = iter(
                {input_name: recognizer_input[i:i + 1]} for i in range(len(recognizer_input)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    target.mkdir(parents=True, exist_ok=True)
    int8_file = rec_file.replace(".onnx", ".int8.onnx")
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(source / rec_file), str(pre), skip_symbolic_shape=True)
        out = Path(tmp) / int8_file
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.Percentile)
        quantized = portable(onnx.load(str(out)))
        replace_atomically(target / int8_file, lambda p: onnx.save(quantized, p))
    files: dict[str, Any] = {}
    for name in manifest["files"]:
        if name != rec_file:
            shutil.copyfile(source / name, target / name)
            files[name] = manifest["files"][name]
    files[int8_file] = {"sha256": sha256_file(target / int8_file),
                        "bytes": (target / int8_file).stat().st_size}
    import onnxruntime
    variant = {
        **manifest,
        "model_set": f"{manifest['model_set']}-int8",
        "model_version": f"{manifest['model_version']}-int8-{files[int8_file]['sha256'][:8]}",
        "recognizer": {**manifest["recognizer"], "file": int8_file},
        "files": files,
        "quantized": {"from": manifest["model_version"], "method": "static QDQ, per-channel "
                      "s8 weights, u8 activations (percentile ranges)",
                      "calibration_faces": len(recognizer_input),
                      "onnxruntime": onnxruntime.__version__},
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json_atomic(target / MANIFEST, variant)
    log.info("INT8 model set %s written to %s", variant["model_version"], target)
    return variant
