"""What photo quality costs: false non-matches against each quality measure.

    python -m benchmarks.quality --model-dir ~/.cache/faceverify/models

Matched LFW pairs are verified at the server's operating point (FMR 1e-3)
with the selfie side degraded step by step, each step as a phone camera
produces it: blurred (Gaussian, radius 0-6 px at 250x250), darkened or
over-exposed (pixel values scaled by 0.12-1.0, or raised towards white).  For
each step: the median of the measure the server reports (sharpness,
brightness) and the false non-match rate (FNMR).  Turned faces cannot be made
from a frontal photo, so ``turn`` is binned over the pairs as they are.

The advice thresholds (``server.pipeline.quality.ADVICE``) are the measure's
value where FNMR reaches twice the clean photos' rate: below it, the applicant
should retake the photo, because it then fails twice as often.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from benchmarks.lfw import default_lfw_dir, image_path, read_pairs
from server.core.service import operating_points
from server.errors import FaceVerifyError
from server.models.manifest import read_calibration
from server.pipeline.faces import AnalysedFace, FacePipeline, FacePolicy
from server.pipeline.image import ImageLimits
from server.pipeline.loader import load_models

Degrade = Callable[[Image.Image], Image.Image]


def blurred(radius: float) -> Degrade:
    return lambda im: im.filter(ImageFilter.GaussianBlur(radius)) if radius else im


def exposed(gain: float) -> Degrade:
    """``gain`` < 1 darkens; > 1 raises every value towards white (over-exposure)."""
    def apply(im: Image.Image) -> Image.Image:
        x = np.asarray(im).astype(np.float32)
        x = x * gain if gain <= 1 else 255 - (255 - x) / gain
        return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
    return apply


STEPS: dict[str, list[tuple[float, Degrade]]] = {
    "blur_radius": [(r, blurred(r)) for r in (0, 1, 1.5, 2, 3, 4, 6)],
    "dark_gain": [(g, exposed(g)) for g in (1.0, 0.6, 0.4, 0.25, 0.18, 0.12)],
    "bright_gain": [(g, exposed(g)) for g in (1.0, 2, 3, 4, 6, 9)],
}
MEASURE = {"blur_radius": "sharpness", "dark_gain": "brightness", "bright_gain": "brightness"}


def encode(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=92)
    return out.getvalue()


def analyse(pipeline: FacePipeline, data: bytes) -> AnalysedFace | None:
    try:
        return pipeline.analyse(data, "selfie", False)
    except FaceVerifyError:
        return None


def where_doubled(rows: list[dict[str, Any]], key: str, base: float) -> float | None:
    """The measure's value where FNMR first reaches twice ``base``, interpolated
    between the steps on either side."""
    for before, after in zip(rows, rows[1:], strict=False):
        if after["fnmr"] >= 2 * base > before["fnmr"]:
            w = (2 * base - before["fnmr"]) / (after["fnmr"] - before["fnmr"])
            return float(before[key] + w * (after[key] - before[key]))
    return None


def run(model_dir: Path, lfw: Path, pairs: int) -> dict[str, Any]:
    models = load_models(model_dir, "cpu", 0, ImageLimits(), FacePolicy(min_face_px=0))
    pipe = models.pipeline
    point = operating_points(read_calibration(model_dir, models.model_version), 1e-3)["photo"]
    matched = [p for fold in read_pairs(lfw) for p in fold if p.same]
    matched = matched[:: max(1, len(matched) // pairs)][:pairs]
    refs = [analyse(pipe, image_path(lfw, p.b).read_bytes()) for p in matched]
    photos = [Image.open(image_path(lfw, p.a)).convert("RGB") for p in matched]
    report: dict[str, Any] = {"model_version": models.model_version, "pairs": len(matched),
                              "threshold": point.threshold}
    base = None
    for name, steps in STEPS.items():
        rows = []
        for level, degrade in steps:
            values, misses = [], 0
            for photo, ref in zip(photos, refs, strict=True):
                face = analyse(pipe, encode(degrade(photo)))
                if face is None or ref is None:
                    misses += 1  # no face: a non-match as the caller sees it
                    continue
                values.append(getattr(face.quality, MEASURE[name]))
                misses += float(face.embedding @ ref.embedding) < point.threshold
            rows.append({name: level, MEASURE[name]: float(np.median(values)),
                         "fnmr": misses / len(photos)})
        base = rows[0]["fnmr"] if base is None else base
        report[name] = {"steps": rows,
                        f"{MEASURE[name]}_where_fnmr_doubles": where_doubled(rows, MEASURE[name],
                                                                             max(base, 1e-3))}
    # Turned faces: the pairs as they are, binned by the selfie's turn.
    turns, misses = [], []
    for photo, ref in zip(photos, refs, strict=True):
        face = analyse(pipe, encode(photo))
        if face is not None and ref is not None:
            turns.append(abs(face.quality.turn))
            misses.append(float(face.embedding @ ref.embedding) < point.threshold)
    t, m = np.array(turns), np.array(misses)
    edges = [0, 0.05, 0.1, 0.15, 0.2, 0.3, 1.0]
    bins = []
    for lo, hi in zip(edges, edges[1:], strict=False):
        inside = (t >= lo) & (t < hi)
        bins.append({"turn_from": lo, "turn_to": hi, "pairs": int(inside.sum()),
                     "fnmr": float(m[inside].mean()) if inside.any() else None})
    report["turn"] = {"bins": bins}
    report["clean_fnmr"] = base
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--pairs", type=int, default=400, help="matched pairs used")
    args = p.parse_args(argv)
    json.dump(run(args.model_dir, args.lfw, args.pairs), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
