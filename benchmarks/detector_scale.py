"""YuNet's input scale against accuracy: the detector at the photo's own scale, with
its landmarks placed again on a crop of the face, against the image fitted into
640x640 (the default).

    python -m benchmarks.detector_scale --model-dir ~/.cache/faceverify/models \\
        [--variants fit640 native crop1.5@320 ...] [--jobs 2] [--images N]

Variants: ``fitN`` (the image scaled so its longer side is N, as the server
does with 640); ``native`` (never enlarged: a 250x250 LFW photo is fed as
256x256); ``cropF@R`` (``native``, then each face's landmarks from YuNet run
again on a square of F times the face box's side around it, scaled to RxR);
``cropF@R+avg`` (the mean of the two sets of landmarks).  Each variant embeds
every lfw-dev photo (both recognizer passes, as the calibration does) and
scores every pair as :mod:`server.models.calibrate` does (label errors left
out): the true-match rate at FMR 1e-3 ... 1e-6, and the detector's CPU time per
photo (its scans and any crop, one thread).  ``--jobs`` variants run at once,
one process each.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.dedup import MORE_LABEL_ERRORS
from benchmarks.lfw import default_lfw_dir
from benchmarks.throughput import load_average, machine
from server.errors import FaceVerifyError
from server.models.calibrate import (
    Embedded,
    _points,
    descending,
    labelled_images,
    pair_scores,
    read_excluded_pairs,
)
from server.pipeline.faces import FacePipeline, FacePolicy
from server.pipeline.geometry import iou
from server.pipeline.image import ImageLimits
from server.pipeline.loader import load_models
from server.pipeline.types import DetectedFace, DetectorInput
from server.pipeline.yunet import YunetDetector

FMRS = (1e-3, 1e-4, 1e-5, 1e-6)
VARIANT = re.compile(r"fit(\d+)|native|crop([\d.]+)@(\d+)(\+avg)?")


class ScaledYunet(YunetDetector):
    """YuNet fed at another scale (see the module), timing its own CPU."""

    def __init__(self, base: YunetDetector, variant: str) -> None:
        match = VARIANT.fullmatch(variant)
        if match is None:
            raise SystemExit(f"unknown variant {variant!r}: fitN, native, cropF@R[+avg]")
        super().__init__(base.session, base.threshold, base.nms_iou, 640)
        fit, factor, crop, avg = match.groups()
        self.fit = int(fit) if fit else None
        self.factor = float(factor) if factor else None
        self.crop = int(crop) if crop else None
        self.average = bool(avg)
        self.cpu = 0.0

    def _scan(self, image: np.ndarray, side: int) -> list[DetectedFace]:
        self.input_size = side
        prepared = YunetDetector.prepare(self, image, 0)
        assert prepared is not None
        return YunetDetector.finish(self, image, prepared, self.infer([prepared.tensor])[0])

    def prepare(self, image: np.ndarray, attempt: int) -> DetectorInput | None:
        start = time.thread_time()
        self.input_size = self.fit or min(640, max(image.shape[:2]))
        try:
            return super().prepare(image, attempt)
        finally:
            self.cpu += time.thread_time() - start

    def infer(self, tensors: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        start = time.thread_time()
        try:
            return super().infer(tensors)
        finally:
            self.cpu += time.thread_time() - start

    def finish(self, image: np.ndarray, prepared: DetectorInput, output: dict[str, np.ndarray]
               ) -> list[DetectedFace]:
        start = time.thread_time()
        faces = super().finish(image, prepared, output)
        try:
            return faces if self.crop is None else [self._refined(image, f) for f in faces]
        finally:
            self.cpu += time.thread_time() - start

    def _refined(self, image: np.ndarray, face: DetectedFace) -> DetectedFace:
        assert self.factor is not None and self.crop is not None
        x0, y0, x1, y1 = face.box
        side = self.factor * max(x1 - x0, y1 - y0)
        origin = np.array([(x0 + x1 - side) / 2, (y0 + y1 - side) / 2])
        crop = np.asarray(Image.fromarray(image).transform(
            (self.crop, self.crop), Image.Transform.EXTENT,
            (*origin, *(origin + side)), Image.Resampling.BILINEAR))
        found = self._scan(crop, self.crop)
        if not found:
            return face
        k = side / self.crop
        boxes = np.array([np.r_[f.box[:2] * k + origin, f.box[2:] * k + origin] for f in found])
        best = found[int(np.argmax(iou(face.box, boxes)))]
        points = best.landmarks * k + origin
        if self.average:
            points = (points + face.landmarks) / 2
        return DetectedFace(box=face.box, score=face.score, landmarks=points)


def measure(model_dir: Path, lfw: Path, variant: str, images: int | None) -> dict[str, Any]:
    models = load_models(model_dir, "cpu", 1, ImageLimits(), FacePolicy())
    base = models.pipeline.detector
    if not isinstance(base, YunetDetector):
        raise SystemExit(f"{model_dir} is not a YuNet model set")
    detector = ScaledYunet(base, variant)
    pipeline = FacePipeline(detector, models.pipeline.recognizer, ImageLimits(), FacePolicy())
    items = labelled_images(lfw / "images")[:images]
    embeddings, labels, names, ids, failed = [], [], [], {}, 0
    start = time.perf_counter()
    for identity, path in items:
        try:
            face = pipeline.analyse(path.read_bytes(), "image", refuse_ambiguous=False)
        except FaceVerifyError:
            failed += 1
            continue
        embeddings.append(face.embedding)
        labels.append(ids.setdefault(identity, len(ids)))
        names.append(path.name)
    exclude = (read_excluded_pairs(lfw / "LABEL_ERRORS.tsv")
               | read_excluded_pairs(MORE_LABEL_ERRORS))
    emb = Embedded(np.asarray(embeddings, np.float32), np.asarray(labels), len(items), failed,
                   tuple(names))
    genuine, impostor, _ = pair_scores(emb, exclude)
    fmrs = [f for f in FMRS if len(impostor) >= 10 / f]
    points = _points(genuine, descending(impostor), fmrs)
    return {"variant": variant, "images": len(items), "without_face": failed,
            "tmr": {f"{p['fmr']:g}": round(100 * p["tmr"], 2) for p in points},
            "detector_cpu_ms_per_image": round(1000 * detector.cpu / max(len(items), 1), 2),
            "seconds": round(time.perf_counter() - start)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="a built YuNet model set")
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--variants", nargs="+",
                   default=["fit640", "native", "crop1.5@320", "crop1.5@320+avg"])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--images", type=int, help="the first N photos only (a quick look)")
    args = p.parse_args(argv)
    if not (args.lfw / "images").is_dir():
        print(f"no lfw-dev images under {args.lfw}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"machine": machine(), "load_before": load_average()}
    with ProcessPoolExecutor(args.jobs) as pool:
        n = len(args.variants)
        report["variants"] = list(pool.map(measure, [args.model_dir] * n, [args.lfw] * n,
                                           args.variants, [args.images] * n))
    report["load_after"] = load_average()
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
