"""Turned photos: what the detector sees at each quarter turn, and whether the
pipeline turns the photo back.

    python -m benchmarks.upright --model-dir ~/.cache/faceverify/models --photos 150

For ``--photos`` lfw-dev photos (spread evenly over the set), each turned by 0,
90, 180 and 270 degrees (lossless ``rot90``):

- the detector alone on the turned pixels: faces found, the best face's score
  (percentiles), and whether its keypoints say "upright" (``down`` pointing
  down, or no ``down`` at all) -- where a detector's keypoints always say
  upright, only its score can tell a turned face (see
  :meth:`server.pipeline.faces.FacePipeline.upright_steps`);
- for the detector's ``upright_score``: the share of upright faces under it
  (they pay for three more detector passes) and of turned faces at or over it
  (those would be taken as upright);
- the whole pipeline: the share of turned photos whose embedding is that of
  the upright photo (cosine >= 0.99) and whose reported turn is right.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lfw import default_lfw_dir
from benchmarks.throughput import machine
from server.errors import FaceVerifyError
from server.pipeline.faces import FacePolicy, most_prominent
from server.pipeline.image import ImageLimits
from server.pipeline.loader import load_models
from server.pipeline.types import detect
from server.pipeline.upright import turn, turns_to_upright


def run(model_dir: Path, lfw: Path, photos: int) -> dict[str, Any]:
    models = load_models(model_dir, "cpu", 0, ImageLimits(), FacePolicy(min_face_px=0))
    pipe = models.pipeline
    files = sorted((lfw / "images").glob("*/*.jpg"))
    files = files[:: max(1, len(files) // photos)][:photos]
    scores: dict[int, list[float]] = {k: [] for k in range(4)}
    says_upright: dict[int, list[bool]] = {k: [] for k in range(4)}
    same: dict[int, list[bool]] = {k: [] for k in range(1, 4)}
    for f in files:
        pixels = pipe.decode(f.read_bytes(), "image").pixels
        try:
            upright = pipe.analyse(pixels, "image", False).embedding
        except FaceVerifyError:
            upright = None
        for k in range(4):
            turned = turn(pixels, k)
            faces = detect(pipe.detector, turned)
            if faces:
                main = most_prominent(faces, turned)
                scores[k].append(main.score)
                says_upright[k].append(main.down is None or turns_to_upright(main.down) == 0)
            if k == 0 or upright is None:
                continue
            try:
                face = pipe.analyse(turned, "image", False)
                same[k].append(float(face.embedding @ upright) >= 0.99
                               and face.turns == (4 - k) % 4)
            except FaceVerifyError:
                same[k].append(False)
    report: dict[str, Any] = {"machine": machine(), "model_version": models.model_version,
                              "photos": len(files), "upright_score": pipe.detector.upright_score}
    for k in range(4):
        s = np.array(scores[k])
        entry: dict[str, Any] = {
            "found": round(len(s) / len(files), 3),
            "score_p1_p5_p50": np.percentile(s, [1, 5, 50]).round(3).tolist() if len(s) else None,
            "keypoints_say_upright": round(float(np.mean(says_upright[k])), 3)
            if says_upright[k] else None}
        if pipe.detector.upright_score is not None and len(s):
            t = pipe.detector.upright_score
            entry["share_under_upright_score" if k == 0 else
                  "share_at_or_over_upright_score"] = round(
                float(np.mean(s < t) if k == 0 else np.mean(s >= t) * len(s) / len(files)), 3)
        if k:
            entry["turned_back_to_the_upright_embedding"] = round(float(np.mean(same[k])), 3)
        report[f"turn_{90 * k}"] = entry
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--photos", type=int, default=150)
    args = p.parse_args(argv)
    json.dump(run(args.model_dir, args.lfw, args.photos), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
