"""Where a 1:1 decision needs the recognizer's mirror pass, on lfw-dev.

    python -m benchmarks.mirror --model-dir ~/.cache/faceverify/models
    python -m benchmarks.mirror --model-dir DIR --write-calibration   # ship the margin

A flipping recognizer (the default SFace set) embeds each face twice, as it is
and mirrored, and averages the two: the embedding the thresholds were
calibrated on, at twice the recognizer's work.  ``Verify`` embeds the plain
pass alone and adds the mirror pass only where the plain score lies within a
margin of a threshold the call is held to (:class:`server.core.service.MirrorRule`).
This measures, for every pair of ``pairs.txt`` (folds 1-5: two photos of one
person, two of different people) and for each reference photo sent back
mirrored (a copy the replay check's face rule must still see), how far the
plain score lies from the whole one.  Folds 1-3 set the margin (the largest
difference seen, times ``--safety``); folds 4-5 and their mirrored references
are held out: how many decisions at each calibrated threshold (every operating
point, the ID-card points and the copy check's face rule) would differ from the
whole embedding's, and what share of calls take the second pass at the server's
default point (FMR 1e-3, with the face rule).  ``--write-calibration`` writes
the ``mirror`` record measured on all folds into this model set's shipped
calibration and the model directory's.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.lfw import Key, default_lfw_dir, image_path, read_pairs
from benchmarks.replay import print_and_ship
from server.errors import FaceVerifyError
from server.models.manifest import read_calibration
from server.pipeline.faces import FacePolicy
from server.pipeline.image import ImageLimits
from server.pipeline.loader import LoadedModels, load_models
from server.pipeline.types import MIRRORED, PLAIN

CALIBRATION_FOLDS = 3  # of pairs.txt's five: the rest are held out


class Halves:
    """The plain and mirrored passes of each image's face (mirrored images too)."""

    def __init__(self, models: LoadedModels, lfw: Path) -> None:
        self.pipeline = models.pipeline
        self.lfw = lfw
        self._seen: dict[tuple[Key, bool], np.ndarray | None] = {}

    def __call__(self, key: Key, mirrored: bool = False) -> np.ndarray | None:
        """(2, dim): the plain and the mirror pass, each L2-normalised; None where the
        image has no usable face."""
        if (key, mirrored) not in self._seen:
            pixels = np.asarray(Image.open(image_path(self.lfw, key)).convert("RGB"))
            if mirrored:
                pixels = np.ascontiguousarray(pixels[:, ::-1])
            try:
                face = self.pipeline.analyse(pixels, "image", False, embed=False)
            except FaceVerifyError:
                self._seen[(key, mirrored)] = None
            else:
                chips = np.stack([face.chip, face.chip])
                self._seen[(key, mirrored)] = self.pipeline.recognizer.embed(
                    chips, [PLAIN, MIRRORED])
        return self._seen[(key, mirrored)]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def scores(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(plain score, whole score) of two faces' halves."""
    return float(a[0] @ b[0]), float(_unit(a[0] + a[1]) @ _unit(b[0] + b[1]))


def measure(halves: Halves, pairs: list[Any]) -> dict[str, np.ndarray]:
    """Plain and whole scores of ``pairs`` (genuine, impostor) and of each pair's first
    photo sent back mirrored against itself (copy)."""
    out: dict[str, list[tuple[float, float]]] = {"genuine": [], "impostor": [], "copy": []}
    for pair in pairs:
        a, b = halves(pair.a), halves(pair.b)
        if a is None or b is None:
            continue
        out["genuine" if pair.same else "impostor"].append(scores(a, b))
        m = halves(pair.a, mirrored=True)
        if m is not None:
            out["copy"].append(scores(m, a))
    return {k: np.asarray(v, np.float64).reshape(-1, 2) for k, v in out.items()}


def thresholds(calibration: dict[str, Any]) -> dict[str, float]:
    """Every threshold a 1:1 decision may be held to, by name."""
    found = {f"photo FMR {p['fmr']:g}": float(p["threshold"]) for p in calibration["points"]}
    for kind, record in calibration.get("reference_kinds", {}).items():
        found |= {f"{kind} FMR {p['fmr']:g}": float(p["threshold"]) for p in record["points"]}
    if "replay" in calibration:
        found["copy face rule"] = float(calibration["replay"]["face_threshold"])
    return found


def held_out(measured: dict[str, np.ndarray], margin: float, limits: dict[str, float],
             default: list[float]) -> dict[str, Any]:
    """Decisions that differ from the whole embedding's without the second pass, per
    threshold, and the share of calls that take it at the ``default`` thresholds."""
    every = np.concatenate(list(measured.values()))
    plain, whole = every[:, 0], every[:, 1]
    differ = {}
    for name, t in limits.items():
        skipped = np.abs(plain - t) > margin
        differ[name] = int(((plain >= t) != (whole >= t))[skipped].sum())
    share = {}
    for kind, rows in measured.items():
        taken = np.zeros(len(rows), bool)
        for t in default:
            taken |= np.abs(rows[:, 0] - t) <= margin
        share[kind] = round(float(taken.mean()), 4) if len(rows) else None
    return {"calls": len(every), "decisions_differing": differ,
            "second_pass_share_at_default": share}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--safety", type=float, default=1.5,
                   help="the margin is the largest difference seen times this (default 1.5)")
    p.add_argument("--default-fmr", type=float, default=1e-3,
                   help="the operating point whose second-pass share is reported")
    p.add_argument("--write-calibration", action="store_true",
                   help="write the measured mirror record into the shipped calibration")
    args = p.parse_args(argv)
    if not (args.lfw / "pairs.txt").is_file():
        print(f"no lfw-dev at {args.lfw} (FACEVERIFY_LFW_DIR)", file=sys.stderr)
        return 2
    start = time.time()
    models = load_models(args.model_dir, "cpu", 0, ImageLimits(), FacePolicy(min_face_px=0))
    if not models.flip:
        print("this model set does not flip: there is no mirror pass to spare",
              file=sys.stderr)
        return 2
    calibration = read_calibration(args.model_dir, models.model_version)
    halves = Halves(models, args.lfw)
    folds = read_pairs(args.lfw)
    seen = measure(halves, [q for f in folds[:CALIBRATION_FOLDS] for q in f])
    unseen = measure(halves, [q for f in folds[CALIBRATION_FOLDS:] for q in f])

    def largest(measured: dict[str, np.ndarray]) -> float:
        every = np.concatenate(list(measured.values()))
        return float(np.abs(every[:, 1] - every[:, 0]).max())

    margin = args.safety * largest(seen)
    limits = thresholds(calibration)
    default = [t for name, t in limits.items()
               if name in (f"photo FMR {args.default_fmr:g}", "copy face rule")]
    every = {k: np.concatenate([seen[k], unseen[k]]) for k in seen}
    record = {"margin": round(args.safety * largest(every), 4),
              "largest_difference": round(largest(every), 4), "safety": args.safety,
              "calls": int(sum(len(v) for v in every.values())),
              "dataset": "lfw-dev pairs.txt, folds 1-5, and each pair's first photo mirrored",
              "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
    report: dict[str, Any] = {
        "model_version": models.model_version,
        "calibration_folds": {"calls": int(sum(len(v) for v in seen.values())),
                              "largest_difference": round(largest(seen), 4),
                              "margin": round(margin, 4)},
        "held_out": {"largest_difference": round(largest(unseen), 4),
                     **held_out(unseen, margin, limits, default)},
        "difference_p50_p99": {k: [round(float(np.percentile(np.abs(v[:, 1] - v[:, 0]), q)), 4)
                                   for q in (50, 99)] for k, v in every.items()},
        "mirror": record, "seconds": round(time.time() - start)}
    return print_and_ship(report, args.model_dir, models, "mirror", record,
                          args.write_calibration)


if __name__ == "__main__":
    sys.exit(main())
