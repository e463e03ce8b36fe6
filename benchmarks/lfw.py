"""LFW accuracy, end to end from the 250x250 images, and the selfie-vs-ID-card benchmark.

    python -m benchmarks.lfw --model-dir ~/.cache/faceverify/models
    python -m benchmarks.lfw --model-dir DIR --pairs 600       # a quicker slice

Protocol (LFW View 2, the 5 folds in lfw-dev/pairs.txt): for each fold the
threshold is the one maximising accuracy on the other folds; report the mean
and standard deviation of held-out accuracy.  An image where no face is found
makes its pairs non-matches (score -1): counted, never skipped.

TMR at FMR 1e-3: genuine scores from the matched pairs; impostor scores from
every cross-identity pair of the benchmark's images (millions), so a 1e-3
rate is estimated from thousands of impostor matches.  The ID-card variant
turns the second image of every pair into an ID-card-like photo (see
``benchmarks.idcard``) and scores selfie (clean) against ID-like.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.core.service import operating_points
from server.errors import FaceVerifyError
from server.models.manifest import read_calibration
from server.pipeline.faces import FacePolicy
from server.pipeline.image import ImageLimits
from server.pipeline.loader import LoadedModels, load_models

Key = tuple[str, int]


@dataclass(frozen=True)
class Pair:
    a: Key
    b: Key
    same: bool


def default_lfw_dir() -> Path:
    repo = Path(__file__).resolve().parent.parent
    return Path(os.environ.get("FACEVERIFY_LFW_DIR", repo.parent / "shared/datasets/lfw-dev"))


def read_pairs(lfw: Path) -> list[list[Pair]]:
    """The folds of ``pairs.txt``: each a list of matched then mismatched pairs."""
    lines = (lfw / "pairs.txt").read_text().split("\n")
    n_folds, n = (int(v) for v in lines[0].split())
    rows = [line.split() for line in lines[1:] if line.strip()]
    folds = []
    for f in range(n_folds):
        chunk = rows[f * 2 * n:(f + 1) * 2 * n]
        folds.append([Pair((r[0], int(r[1])), (r[0], int(r[2])), True) if len(r) == 3 else
                      Pair((r[0], int(r[1])), (r[2], int(r[3])), False) for r in chunk])
    return folds


def image_path(lfw: Path, key: Key) -> Path:
    return lfw / "images" / key[0] / f"{key[0]}_{key[1]:04d}.jpg"


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold maximising accuracy of ``scores >= t`` (midpoints between scores)."""
    s = np.unique(scores)
    candidates = np.concatenate([[s[0] - 1e-6], (s[:-1] + s[1:]) / 2, [s[-1] + 1e-6]])
    acc = [((scores >= t) == same).mean() for t in candidates]
    return float(candidates[int(np.argmax(acc))])


def fold_accuracy(folds_scores: list[np.ndarray], folds_same: list[np.ndarray]) -> list[float]:
    """Held-out accuracy per fold, threshold chosen on the other folds."""
    out = []
    for i in range(len(folds_scores)):
        train_s = np.concatenate([s for j, s in enumerate(folds_scores) if j != i])
        train_y = np.concatenate([y for j, y in enumerate(folds_same) if j != i])
        t = best_threshold(train_s, train_y)
        out.append(float(((folds_scores[i] >= t) == folds_same[i]).mean()))
    return out


def tmr_at_fmr(genuine: np.ndarray, impostor: np.ndarray, fmr: float) -> tuple[float, float]:
    """(TMR, threshold) at the lowest threshold with impostor match rate <= fmr."""
    allowed = int(np.floor(fmr * len(impostor)))
    t = float(np.nextafter(np.float32(-np.sort(-impostor)[allowed]), np.float32(np.inf)))
    return float((genuine >= t).mean()), t


RESULTS = Path(__file__).resolve().parent / "results"
PIPELINE_CODE = Path(__file__).resolve().parent.parent / "server" / "pipeline"


def pipeline_code() -> str:
    """A digest of the code that turns an image into an embedding."""
    h = hashlib.sha256()
    for path in sorted(PIPELINE_CODE.glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:10]


class Embedder:
    """Embeds LFW images (optionally transformed) through the real pipeline, with counts.

    Clean-image embeddings are cached on disk per model version and pipeline
    code (``benchmarks/results/``, git-ignored) so the benchmarks share one
    pass: a change to the pipeline's code is a new cache, never stale figures.
    """

    def __init__(self, model_dir: Path, lfw: Path,
                 transform: Callable[[bytes, Key], bytes] | None = None,
                 models: LoadedModels | None = None) -> None:
        self.models = models or load_models(model_dir, "cpu", 0, ImageLimits(),
                                            FacePolicy(min_face_px=0))
        self.lfw = lfw
        self.transform = transform
        self.cache: dict[Key, np.ndarray | None] = {}
        self.failures: dict[str, int] = {}
        self.ambiguous = 0
        self.seconds = 0.0
        self.computed = 0
        self.stored: dict[str, tuple[np.ndarray | None, str | None, bool]] = {}
        if transform is None and self._cache_file().is_file():
            with np.load(self._cache_file(), allow_pickle=True) as z:
                self.stored = z["stored"].item()

    def _cache_file(self) -> Path:
        # The detector's settings (its input size) place the landmarks too.
        detector = hashlib.sha256(json.dumps(self.models.manifest["detector"],
                                             sort_keys=True).encode()).hexdigest()[:8]
        return RESULTS / f"embeddings-{self.models.model_version}-{pipeline_code()}-{detector}.npz"

    def save(self) -> None:
        if self.transform is None:
            RESULTS.mkdir(exist_ok=True)
            np.savez(self._cache_file(), stored=np.array(self.stored, dtype=object))

    def __call__(self, key: Key) -> np.ndarray | None:
        if key in self.cache:
            return self.cache[key]
        name = f"{key[0]}/{key[1]}"
        if name in self.stored:
            emb_s, reason_s, ambiguous_s = self.stored[name]
            self._count(emb_s, reason_s, ambiguous_s)
            self.cache[key] = emb_s
            return emb_s
        data = image_path(self.lfw, key).read_bytes()
        if self.transform is not None:
            data = self.transform(data, key)
        start = time.perf_counter()
        reason: str | None = None
        ambiguous = False
        try:
            face = self.models.pipeline.analyse(data, "image", refuse_ambiguous=False)
            emb: np.ndarray | None = face.embedding
            ambiguous = face.ambiguous
        except FaceVerifyError as exc:
            reason = getattr(exc, "reason", type(exc).__name__)
            emb = None
        self.seconds += time.perf_counter() - start
        self.computed += 1
        self._count(emb, reason, ambiguous)
        self.cache[key] = emb
        self.stored[name] = (emb, reason, ambiguous)
        return emb

    def _count(self, emb: np.ndarray | None, reason: str | None, ambiguous: bool) -> None:
        if reason is not None:
            self.failures[reason] = self.failures.get(reason, 0) + 1
        self.ambiguous += ambiguous


def scores_for(pairs: list[Pair], left: Embedder, right: Embedder) -> np.ndarray:
    out = []
    for p in pairs:
        ea, eb = left(p.a), right(p.b)
        out.append(-1.0 if ea is None or eb is None else float(ea @ eb))
    return np.asarray(out)


def impostor_scores(left: Embedder, right: Embedder) -> np.ndarray:
    """Scores of every (left image, right image) pair of different identities."""
    lk = [k for k, v in left.cache.items() if v is not None]
    rk = [k for k, v in right.cache.items() if v is not None]
    la = np.stack([left.cache[k] for k in lk])  # type: ignore[misc]
    ra = np.stack([right.cache[k] for k in rk])  # type: ignore[misc]
    sims = la @ ra.T
    lid = np.array([k[0] for k in lk])
    rid = np.array([k[0] for k in rk])
    return sims[lid[:, None] != rid[None, :]]


def server_points(model_dir: Path, model_version: str, genuine: np.ndarray,
                  impostor: np.ndarray) -> dict[str, object]:
    """TMR and FMR of ``genuine``/``impostor`` scores at the calibrated decision
    points (FMR 1e-3) of each reference kind, where the model set is calibrated."""
    try:
        calibration = read_calibration(model_dir, model_version)
    except FaceVerifyError:
        return {}
    out: dict[str, object] = {}
    for kind, point in operating_points(calibration, 1e-3).items():
        out[f"at_server_{kind}_point"] = {
            "threshold": point.threshold, "tmr": float((genuine >= point.threshold).mean()),
            "fmr": float((impostor >= point.threshold).mean())}
    return out


def evaluate(model_dir: Path, lfw: Path, max_pairs: int | None, idcard: bool,
             flip: bool = True) -> dict[str, object]:
    folds = read_pairs(lfw)
    if max_pairs:
        per_fold = max(2, max_pairs // len(folds))
        folds = [f[: per_fold // 2] + f[len(f) // 2: len(f) // 2 + per_fold // 2] for f in folds]
    clean = Embedder(model_dir, lfw, models=load_models(
        model_dir, "cpu", 0, ImageLimits(), FacePolicy(min_face_px=0), flip=flip))
    start = time.perf_counter()
    fs = [scores_for(f, clean, clean) for f in folds]
    fy = [np.array([p.same for p in f]) for f in folds]
    accs = fold_accuracy(fs, fy)
    images = len(clean.cache)
    no_face = clean.failures.get("NO_FACE_DETECTED", 0)
    genuine = np.concatenate([s[y] for s, y in zip(fs, fy, strict=True)])
    tmr, t = tmr_at_fmr(genuine, impostor_scores(clean, clean), 1e-3)
    report: dict[str, object] = {
        "model_version": clean.models.model_version,
        "pairs": int(sum(len(f) for f in folds)),
        "images": images,
        "no_face_images": no_face,
        "no_face_rate": no_face / images,
        "other_failures": {k: v for k, v in clean.failures.items() if k != "NO_FACE_DETECTED"},
        "images_a_selfie_check_would_refuse_as_multiple_faces": clean.ambiguous,
        "accuracy_mean": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "fold_accuracies": accs,
        "clean_vs_clean": {"tmr_at_fmr_1e-3": tmr, "threshold": t},
        "seconds_per_image_computed": clean.seconds / max(clean.computed, 1),
    }
    clean.save()
    if idcard:
        from benchmarks.idcard import id_card_like

        ids = Embedder(model_dir, lfw, transform=id_card_like, models=clean.models)
        gs = np.concatenate([scores_for([p for p in f if p.same], clean, ids) for f in folds])
        impostors = impostor_scores(clean, ids)
        tmr_id, t_id = tmr_at_fmr(gs, impostors, 1e-3)
        report["selfie_vs_id_like"] = {
            "tmr_at_fmr_1e-3": tmr_id,
            "threshold": t_id,
            "id_like_images": len(ids.cache),
            "id_like_failures": ids.failures,
            # What the server decides with its calibrated points (FMR 1e-3): the
            # ordinary-photo one, and the ID-card one where calibrated.
            **server_points(model_dir, clean.models.model_version, gs, impostors),
        }
    report["wall_seconds"] = time.perf_counter() - start
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--lfw", type=Path, default=default_lfw_dir())
    p.add_argument("--pairs", type=int, help="use about this many pairs (default: all 3000)")
    p.add_argument("--no-idcard", action="store_true", help="skip the ID-card-like variant")
    p.add_argument("--no-flip", action="store_true",
                   help="embed each face once, without averaging in its mirror image")
    args = p.parse_args(argv)
    if not (args.lfw / "pairs.txt").is_file():
        print(f"LFW dev not found at {args.lfw}; set FACEVERIFY_LFW_DIR", file=sys.stderr)
        return 2
    report = evaluate(args.model_dir, args.lfw, args.pairs, not args.no_idcard,
                      not args.no_flip)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
