"""dlib's 5-point shape predictor (an ensemble of regression trees), in numpy.

Inference follows ``shared/docs/dlib-format.md`` section b.5: for each
cascade, fit the similarity from the mean shape to the current shape, sample
800 pixel intensities around anchored landmarks, walk 500 depth-4 trees on
pixel differences and add their leaves to the shape.  The trees of a cascade
are walked together, one vectorised step per depth level.  Intensities are
computed only at the sampled pixels, never for the whole image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class ShapePredictor:
    """Predicts landmarks inside a face box.

    Args:
        path: the ``.npz`` written by the model build (arrays of
            :class:`server.models.dlib_format.ShapePredictor`).
    """

    def __init__(self, path: Path) -> None:
        with np.load(path) as z:
            self.initial = z["initial_shape"].astype(np.float64)
            split_idx = z["split_idx"]
            split_thresh = z["split_thresh"]
            leaves = z["leaves"]
            self.anchor_idx = z["anchor_idx"]
            self.deltas = z["deltas"].astype(np.float64)
        n_cascades, n_trees, n_splits, _ = split_idx.shape
        n_leaves = leaves.shape[2]
        # Flat per cascade, indexed by tree * n_splits + node (tree * n_leaves + leaf):
        # one 1-D gather per tree level instead of 3-D fancy indexing.
        self.splits = split_idx.reshape(n_cascades, n_trees * n_splits, 2)
        self.thresholds = split_thresh.reshape(n_cascades, n_trees * n_splits)
        self.leaves = leaves.reshape(n_cascades, n_trees * n_leaves, -1).astype(np.float64)
        self._split_base = np.arange(n_trees) * n_splits
        self._leaf_base = np.arange(n_trees) * n_leaves - n_splits
        self._depth = int(np.log2(n_splits + 1))
        # The similarity from the mean shape to the current one has a closed form
        # (least squares over scaled rotations; dlib's find_similarity_transform).
        self._centred = self.initial - self.initial.mean(0)
        norm = float((self._centred ** 2).sum())
        self._fit_a = self._centred / norm
        self._fit_b = np.stack([-self._centred[:, 1], self._centred[:, 0]], axis=1) / norm

    def predict(self, image: np.ndarray, box: np.ndarray, rounded: bool = True) -> np.ndarray:
        """Landmarks for one box.

        Args:
            image: (H, W, 3) uint8 RGB; intensities are ``floor((R+G+B)/3)`` as dlib
                computes them, taken only at the pixels sampled.
            box: (left, top, right, bottom) integer face rectangle.

        Returns:
            (P, 2) float landmark coordinates in the image, rounded to whole
            pixels like dlib's when ``rounded``.
        """
        left, top, right, bottom = (float(v) for v in box)
        scale = np.array([right - left, bottom - top])
        origin = np.array([left, top])
        h, w = image.shape[:2]
        current = self.initial.copy()
        for c in range(len(self.splits)):
            d = current - current.mean(0)
            a, b = float((d * self._fit_a).sum()), float((d * self._fit_b).sum())
            # dlib keeps the transform in float32
            rot = np.array([[a, -b], [b, a]], dtype=np.float32).astype(np.float64)
            pts = current[self.anchor_idx[c]] + self.deltas[c] @ rot.T
            img_pts = np.floor(pts * scale + origin + 0.5).astype(np.int64)
            x, y = img_pts[:, 0], img_pts[:, 1]
            inside = (x >= 0) & (y >= 0) & (x < w) & (y < h)
            feats = np.zeros(len(pts), dtype=np.float32)
            feats[inside] = image[y[inside], x[inside]].sum(axis=1, dtype=np.uint16) // 3
            node = np.zeros(len(self._split_base), dtype=np.int64)
            for _ in range(self._depth):
                at = self._split_base + node
                pair = self.splits[c, at]
                go_left = feats[pair[:, 0]] - feats[pair[:, 1]] > self.thresholds[c, at]
                node = 2 * node + 2 - go_left
            current = current + self.leaves[c, self._leaf_base + node].sum(axis=0).reshape(
                current.shape)
        points: np.ndarray = current * scale + origin
        return np.floor(points + 0.5) if rounded else points
