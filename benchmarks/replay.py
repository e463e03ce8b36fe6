"""The replay check on lfw-dev: genuine pairs against copies of the reference.

    python -m benchmarks.replay --model-dir ~/.cache/faceverify/models
    python -m benchmarks.replay --model-dir DIR --write-calibration   # ship what it measured

Genuine pairs: every pair of two different photos of one lfw-dev identity
(what a real selfie and a real reference photo are).  Their copy scores set
the threshold (the lowest that at most 0.1 % of them reach,
:func:`server.models.calibrate.replay_record`, as ``faceverify calibrate``
does) and their embeddings' cosines the enrolled-copy threshold.

Copies (the "selfie" an impostor sends, made from the reference photo of
``--references`` identities, seeded): ``reencoded`` (JPEG quality 80, resized
0.5-1.6x), ``cropped`` (70-90 % of the frame, the face kept), ``turned``
(3-8 degrees either way), ``card_cut`` (reference: the clean photo; selfie:
the face cut from a photograph of an ID card printed with it,
:func:`benchmarks.idcard.id_card_like`), ``card_reencoded`` (reference: that
card photograph; selfie: the card photograph itself re-encoded at twice the
size), ``card_second_shot`` (reference: one photograph of the card; selfie:
another photograph of the same card).  Reported: the share of each caught
at the threshold, the share of genuine pairs a threshold that caught 99 % of
each would take for copies, and what the check costs per Verify.  The copies are
simulated: they are not a test by an accredited lab.

``--write-calibration`` writes the ``replay`` record into this model set's
shipped calibration (``server/models/calibration/<set>.json``) and the model
directory's ``calibration.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.idcard import id_card_like
from benchmarks.lfw import default_lfw_dir
from server.errors import FaceVerifyError
from server.models.calibrate import (
    Embedded,
    embed_labelled,
    genuine_copy_scores,
    labelled_images,
    pair_scores,
    replay_record,
)
from server.models.manifest import read_calibration, write_json_atomic
from server.pipeline import replay
from server.pipeline.faces import AnalysedFace, FacePipeline, FacePolicy
from server.pipeline.image import ImageLimits
from server.pipeline.loader import load_models

SHIPPED_CALIBRATIONS = Path(__file__).resolve().parent.parent / "server/models/calibration"


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def copies(data: bytes, key: str) -> dict[str, tuple[bytes | None, bytes]]:
    """Each kind of copy of the photo ``data``: (reference, selfie); a None
    reference is the photo itself."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    photo = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = photo.size
    scale = float(rng.uniform(0.5, 1.6))
    c = float(rng.uniform(0.7, 0.9))
    x0 = int(rng.uniform(0.25, 0.75) * (1 - c) * w)
    y0 = int(rng.uniform(0.25, 0.75) * (1 - c) * h)
    degrees = float(rng.choice([-1, 1]) * rng.uniform(3, 8))
    name, index = key.rsplit("_", 1)
    card = id_card_like(data, (name, int(index)))
    card_image = Image.open(io.BytesIO(card)).convert("RGB")
    return {
        "reencoded": (None, _jpeg(photo.resize((round(w * scale), round(h * scale)),
                                               Image.Resampling.BILINEAR), 80)),
        "cropped": (None, _jpeg(photo.crop((x0, y0, x0 + round(c * w), y0 + round(c * h))), 85)),
        "turned": (None, _jpeg(photo.rotate(degrees, resample=Image.Resampling.BILINEAR,
                                            expand=True, fillcolor=(235, 235, 235)), 85)),
        "card_cut": (None, id_card_like(data, (name + "#copy", int(index)))),
        "card_reencoded": (card, _jpeg(card_image.resize((card_image.width * 2,
                                                          card_image.height * 2),
                                                         Image.Resampling.BICUBIC), 80)),
        "card_second_shot": (card, id_card_like(data, (name + "#second", int(index)))),
    }


def _analyse(pipeline: FacePipeline, data: bytes) -> AnalysedFace | None:
    try:
        return pipeline.analyse(data, "image", refuse_ambiguous=False, view=True)
    except FaceVerifyError:
        return None


def genuine_faces(pipeline: FacePipeline, lfw: Path) -> Embedded:
    """Every photo of the lfw-dev identities with two or more, as calibrate embeds them."""
    items = labelled_images(lfw / "images")
    photos = Counter(identity for identity, _ in items)
    return embed_labelled(pipeline, [(i, f) for i, f in items if photos[i] > 1])


def copy_results(pipeline: FacePipeline, lfw: Path, references: int, check: replay.ReplayCheck,
                 seed: int, genuine: np.ndarray) -> dict[str, Any]:
    people = sorted(d for d in (lfw / "images").iterdir() if d.is_dir())
    random.Random(seed).shuffle(people)
    scores: dict[str, list[float]] = {}
    cosines: dict[str, list[float]] = {}
    no_face: dict[str, int] = {}
    seconds = []
    for person in people[:references]:
        first = sorted(person.glob("*.jpg"))[0]
        data = first.read_bytes()
        clean = _analyse(pipeline, data)
        if clean is None:
            continue
        for kind, (reference, selfie) in copies(data, first.stem).items():
            ref = clean if reference is None else _analyse(pipeline, reference)
            face = _analyse(pipeline, selfie)
            if ref is None or face is None:
                no_face[kind] = no_face.get(kind, 0) + 1
                continue
            start = time.process_time()
            score = replay.copy_score(face.kept_view(), ref.kept_view())
            seconds.append(time.process_time() - start)
            scores.setdefault(kind, []).append(score)
            cosines.setdefault(kind, []).append(float(face.embedding @ ref.embedding))
    return {
        "copies": {kind: {"pairs": len(v), "no_face": no_face.get(kind, 0),
                          "caught": round(float(np.mean(np.asarray(v) >= check.threshold)), 4),
                          # the price of catching 99 % of this kind: the genuine pairs
                          # at or above its 1st percentile
                          "genuine_rate_to_catch_99": round(float(np.mean(
                              genuine >= np.percentile(v, 1))), 5),
                          "score_p5_p50": [round(float(np.percentile(v, q)), 3) for q in (5, 50)],
                          "embedding_cosine_p50": round(float(np.median(cosines[kind])), 3)}
                   for kind, v in scores.items()},
        "check_ms_per_verify_cpu": round(float(np.median(seconds)) * 1000, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--references", type=int, default=1000,
                   help="identities whose reference photo is copied (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-calibration", action="store_true",
                   help="write the measured replay record into the shipped calibration")
    args = p.parse_args(argv)
    if not (args.lfw / "images").is_dir():
        print(f"no lfw-dev at {args.lfw} (FACEVERIFY_LFW_DIR)", file=sys.stderr)
        return 2
    models = load_models(args.model_dir, "cpu", 0, ImageLimits(), FacePolicy(min_face_px=0))
    start = time.time()
    emb = genuine_faces(models.pipeline, args.lfw)
    genuine_cos, _, _ = pair_scores(emb)
    record = replay_record(emb, genuine_cos)
    copy_scores = genuine_copy_scores(emb)
    order = np.argsort(-copy_scores)
    check = replay.ReplayCheck(record["threshold"], record["template_threshold"])
    report: dict[str, Any] = {
        "model_version": models.model_version, "replay": record,
        "genuine_copy_score_p50_p99_p999": [round(float(np.percentile(copy_scores, q)), 3)
                                            for q in (50, 99, 99.9)],
        "genuine_top_scores": [round(float(copy_scores[i]), 3) for i in order[:10]],
        "images": emb.images, "images_without_face": emb.failed,
        **copy_results(models.pipeline, args.lfw, args.references, check, args.seed,
                       copy_scores),
        "seconds": round(time.time() - start),
    }
    if args.write_calibration:
        calibration = read_calibration(args.model_dir, models.model_version)
        calibration["replay"] = record
        write_json_atomic(args.model_dir / "calibration.json", calibration)
        shipped = SHIPPED_CALIBRATIONS / f"{models.manifest['model_set']}.json"
        if shipped.is_file():
            record_of = json.loads(shipped.read_text())
            record_of["replay"] = record
            write_json_atomic(shipped, record_of)
            report["written"] = [str(args.model_dir / "calibration.json"), str(shipped)]
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
