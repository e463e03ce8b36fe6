"""Accuracy regression on real faces: a few hundred LFW dev pairs, end to end.

The full 3000-pair benchmark is ``python -m benchmarks.lfw``; this is its
fast slice, run for every model set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.fusion import fused
from benchmarks.lfw import fold_accuracy, image_path, read_pairs
from server.errors import NoFaceDetected
from server.pipeline.loader import LoadedModels

# Cross-validated accuracy on the slice must stay at or above these (full-benchmark
# figures are in docs/figures.md; the slice is noisier, hence the margin).
MIN_ACCURACY = {"sface-yunet": 0.98, "dlib-blazeface": 0.975, "operator": 0.95}


def test_lfw_slice_accuracy(models: LoadedModels, lfw_dir: Path) -> None:
    folds = read_pairs(lfw_dir)[:2]
    folds = [f[:75] + f[300:375] for f in folds]  # 75 matched + 75 mismatched per fold
    cache: dict[tuple[str, int], np.ndarray | None] = {}

    def embed(key: tuple[str, int]) -> np.ndarray | None:
        if key not in cache:
            try:
                cache[key] = models.pipeline.analyse(image_path(lfw_dir, key).read_bytes(),
                                                     "image", refuse_ambiguous=False).embedding
            except NoFaceDetected:
                cache[key] = None
        return cache[key]

    scores, same = [], []
    for fold in folds:
        s = []
        for p in fold:
            a, b = embed(p.a), embed(p.b)
            s.append(-1.0 if a is None or b is None else float(a @ b))
        scores.append(np.asarray(s))
        same.append(np.array([p.same for p in fold]))
    no_face = sum(v is None for v in cache.values())
    accuracy = float(np.mean(fold_accuracy(scores, same)))
    print(f"{models.model_version}: accuracy {accuracy:.4f} on {sum(map(len, folds))} pairs, "
          f"no face in {no_face}/{len(cache)} images")
    assert no_face <= 0.01 * len(cache)
    assert accuracy >= MIN_ACCURACY[models.manifest["model_set"]]


def test_a_fused_embeddings_cosine_is_the_z_weighted_sum_of_its_models() -> None:
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(200), 2)
    parts = []
    for dim in (8, 12):
        x = rng.normal(size=(len(labels), dim)).astype(np.float32)
        parts.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    joined, spreads = fused(parts, labels)
    assert np.allclose(np.linalg.norm(joined, axis=1), 1.0, atol=1e-5)
    weights = [1 / s for s in spreads]
    cosines = [p[:50] @ p[50:100].T for p in parts]
    expected = sum(w * c for w, c in zip(weights, cosines, strict=True)) / sum(weights)
    assert np.allclose(joined[:50] @ joined[50:100].T, expected, atol=1e-5)
