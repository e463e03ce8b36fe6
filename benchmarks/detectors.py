"""Where BlazeFace's keypoints put dlib's landmark box: the fit behind ``DLIB_BOX``.

    python -m benchmarks.detectors --model-dir ~/.cache/faceverify/models \\
        --mmod-dir DIR_BUILT_WITH_--builtin-detector_mmod --images 1500

dlib's shape predictor was trained on its own detectors' boxes.  For each
lfw-dev image where both detectors find the central face (and agree on it),
MMOD's box is expressed in BlazeFace's face frame (origin: the middle of the
eyes; unit: eye-middle-to-mouth distance; y along eye-middle -> mouth); the
medians of its centre and side are :data:`server.pipeline.blazeface.DLIB_BOX`.
Also prints the median absolute deviation and each detector's time per image
(first scan: input, model, boxes; one core; no landmarks, which both share).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.lfw import default_lfw_dir
from server.pipeline.blazeface import BlazeFaceDetector
from server.pipeline.faces import FacePolicy
from server.pipeline.image import ImageLimits, decode_image
from server.pipeline.loader import load_models
from server.pipeline.mmod import MmodDetector


def central(boxes: list[np.ndarray], width: int, height: int) -> int:
    """The index of the box whose centre is nearest the image's."""
    centre = np.array([width / 2, height / 2])
    return int(np.argmin([np.hypot(*((b[:2] + b[2:]) / 2 - centre)) for b in boxes]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="a BlazeFace model set")
    p.add_argument("--mmod-dir", type=Path, required=True, help="an MMOD model set")
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--images", type=int, default=1500)
    args = p.parse_args(argv)
    blaze = load_models(args.model_dir, "cpu", 1, ImageLimits(), FacePolicy()).pipeline.detector
    mmod = load_models(args.mmod_dir, "cpu", 1, ImageLimits(), FacePolicy()).pipeline.detector
    if not isinstance(blaze, BlazeFaceDetector) or not isinstance(mmod, MmodDetector):
        print("--model-dir must hold a BlazeFace set, --mmod-dir an MMOD set", file=sys.stderr)
        return 2
    paths = sorted((args.lfw / "images").glob("*/*.jpg"))
    paths = random.Random(1).sample(paths, min(args.images, len(paths)))
    frames, seconds = [], {"blazeface": 0.0, "mmod": 0.0}
    for path in paths:
        image = decode_image(path.read_bytes(), ImageLimits(), "image").pixels
        h, w = image.shape[:2]
        start = time.perf_counter()
        prepared = blaze.prepare(image, 0)
        assert prepared is not None
        found = blaze.keypoints(prepared, blaze.infer([prepared.tensor])[0])
        seconds["blazeface"] += time.perf_counter() - start
        start = time.perf_counter()
        scan = mmod.prepare(image, 0)
        assert scan is not None
        windows = mmod.finish(image, scan, mmod.infer([scan.tensor])[0])
        seconds["mmod"] += time.perf_counter() - start
        if not found or not windows:
            continue
        box, kps, _ = found[central([f[0] for f in found], w, h)]
        target = windows[central([f.box for f in windows], w, h)].box
        if np.hypot(*((target[:2] + target[2:]) / 2 - (box[:2] + box[2:]) / 2)) > \
                0.5 * (target[2] - target[0]):
            continue  # the two found different faces
        eyes = (kps[0] + kps[1]) / 2
        down = kps[3] - eyes
        unit = float(np.hypot(*down))
        frame = np.stack([np.array([-down[1], down[0]]), down]) / unit ** 2
        centre = (target[:2] + target[2:]) / 2 - eyes
        frames.append([*(frame @ centre), (target[2] - target[0]) / unit])
    fit = np.asarray(frames)
    median = np.median(fit, axis=0)
    report = {
        "faces": len(fit), "images": len(paths),
        "dlib_box_centre_x_centre_y_side": [round(float(v), 3) for v in median],
        "median_abs_deviation": [round(float(v), 3)
                                 for v in np.median(np.abs(fit - median), axis=0)],
        "ms_per_image_one_core": {k: round(1000 * v / len(paths), 2)
                                  for k, v in seconds.items()},
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
