"""Bona fide bursts of one photo on simulated heads that turn further or less: which
challenges are refused, and why.

    python -m benchmarks.liveness_yaw --model-dir ~/.cache/faceverify/models \\
        [--yaw 20 30] [--challenges 40] [--nose-search 16]

One lfw-dev photo (``--photo``) on a head that turns ``--yaw`` degrees, nods 20
and comes closer to 0.65 of its distance (the test suite's subject), for the same
``--challenges`` random challenges at each yaw, each burst analysed as the server
does and assessed with the model set's calibrated thresholds.  ``--nose-search``
replaces the nose's search radius (in 112ths of the chip's side; the measure's
is 16) to see what a wider one does.  Prints each refused challenge and the
counts.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks import liveness_sim as sim
from benchmarks.lfw import default_lfw_dir
from benchmarks.liveness import frames_of
from benchmarks.throughput import machine
from server.models.manifest import read_calibration
from server.pipeline import liveness as lv
from server.pipeline.faces import FacePolicy
from server.pipeline.image import ImageLimits
from server.pipeline.loader import load_models


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--photo", default="Abel_Pacheco/Abel_Pacheco_0001.jpg")
    p.add_argument("--yaw", type=float, nargs="+", default=[20.0, 30.0])
    p.add_argument("--challenges", type=int, default=40)
    p.add_argument("--nose-search", type=int, help="the nose search radius, in 112ths")
    args = p.parse_args(argv)
    if args.nose_search is not None:
        lv.NOSE_SEARCH = args.nose_search / 112
    models = load_models(args.model_dir, "cpu", 1, ImageLimits(), FacePolicy(min_face_px=0))
    thresholds = lv.Thresholds.from_calibration(read_calibration(args.model_dir,
                                                                 models.model_version))
    if thresholds is None:
        print("this model set has no liveness calibration", file=sys.stderr)
        return 2
    data = (args.lfw / "images" / args.photo).read_bytes()
    face = models.pipeline.analyse(data, "photo", False, frame=True)  # as benchmarks.liveness
    photo = sim.Photo(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
                      face.face.landmarks)
    draw = random.Random(11)
    challenges = [lv.new_challenge(draw) for _ in range(args.challenges)]
    report: dict[str, Any] = {"machine": machine(), "photo": args.photo,
                              "nose_search": round(lv.NOSE_SEARCH * 112), "yaw": {}}
    for yaw in args.yaw:
        subject = sim.Subject(yaw=math.radians(yaw), pitch=math.radians(20), closer=0.65,
                              distance=6.5, delay=0.2, sway=math.radians(1))
        refused: Counter[str] = Counter()
        for challenge in challenges:
            rng = np.random.default_rng(0)
            burst = sim.capture(sim.bona_fide_layers(photo), sim.poses(challenge, subject, rng),
                                rng)
            analysed = frames_of(models.pipeline, burst)
            if analysed is None:
                refused["a frame without one face"] += 1
                continue
            frames, faces = analysed
            a = lv.assess(challenge, frames, thresholds,
                          lambda idx, faces=faces: [faces[i].embedding for i in idx])
            reasons = a.reasons(thresholds)
            if reasons:
                refused[reasons[0]] += 1
                print(f"yaw {yaw:g}: {' '.join(s.action.value for s in challenge[1:])}: "
                      f"{', '.join(reasons)} (depth {a.depth:.3f}, parallax {a.parallax:.3f})",
                      file=sys.stderr)
        report["yaw"][f"{yaw:g}"] = {"challenges": len(challenges), "refused": dict(refused)}
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
