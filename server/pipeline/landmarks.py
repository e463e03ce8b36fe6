"""dlib's 5-point shape predictor (an ensemble of regression trees), in numpy.

Inference follows ``shared/docs/dlib-format.md`` section b.5: for each
cascade, fit the similarity from the mean shape to the current shape, sample
800 pixel intensities around anchored landmarks, walk 500 depth-4 trees on
pixel differences and add their leaves to the shape.  The trees of a cascade
are walked together, one vectorised step per depth level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.pipeline.geometry import umeyama


class ShapePredictor:
    """Predicts landmarks inside a face box.

    Args:
        path: the ``.npz`` written by the model build (arrays of
            :class:`server.models.dlib_format.ShapePredictor`).
    """

    def __init__(self, path: Path) -> None:
        with np.load(path) as z:
            self.initial = z["initial_shape"].astype(np.float64)
            self.split_idx = z["split_idx"]
            self.split_thresh = z["split_thresh"]
            self.leaves = z["leaves"]
            self.anchor_idx = z["anchor_idx"]
            self.deltas = z["deltas"].astype(np.float64)
        n_cascades, n_trees, n_splits, _ = self.split_idx.shape
        self._tree_range = np.arange(n_trees)
        self._depth = int(np.log2(n_splits + 1))
        self._n_splits = n_splits

    def predict(self, gray: np.ndarray, box: np.ndarray, rounded: bool = True) -> np.ndarray:
        """Landmarks for one box.

        Args:
            gray: (H, W) intensity image, ``floor((R+G+B)/3)`` as dlib computes it.
            box: (left, top, right, bottom) integer face rectangle.

        Returns:
            (P, 2) float landmark coordinates in the image, rounded to whole
            pixels like dlib's when ``rounded``.
        """
        left, top, right, bottom = (float(v) for v in box)
        scale = np.array([right - left, bottom - top])
        origin = np.array([left, top])
        h, w = gray.shape
        current = self.initial.copy()
        for c in range(self.split_idx.shape[0]):
            a, _ = umeyama(self.initial, current)
            a = a.astype(np.float32).astype(np.float64)
            pts = current[self.anchor_idx[c]] + self.deltas[c] @ a.T
            img_pts = np.floor(pts * scale + origin + 0.5).astype(np.int64)
            x, y = img_pts[:, 0], img_pts[:, 1]
            inside = (x >= 0) & (y >= 0) & (x < w) & (y < h)
            feats = np.zeros(len(pts), dtype=np.float32)
            feats[inside] = gray[y[inside], x[inside]]
            node = np.zeros_like(self._tree_range)
            for _ in range(self._depth):
                idx = self.split_idx[c, self._tree_range, node]
                diff = feats[idx[:, 0]] - feats[idx[:, 1]]
                left_branch = diff > self.split_thresh[c, self._tree_range, node]
                node = np.where(left_branch, 2 * node + 1, 2 * node + 2)
            current = current + self.leaves[c, self._tree_range, node - self._n_splits].sum(
                axis=0, dtype=np.float64)
        points: np.ndarray = current * scale + origin
        return np.floor(points + 0.5) if rounded else points
