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
        # every gather is a 1-D ``take``, the fastest indexing numpy has.
        self.split_a = split_idx[..., 0].reshape(n_cascades, -1).astype(np.intp)
        self.split_b = split_idx[..., 1].reshape(n_cascades, -1).astype(np.intp)
        self.thresholds = split_thresh.reshape(n_cascades, n_trees * n_splits)
        self.leaves = leaves.reshape(n_cascades, n_trees * n_leaves, -1)
        self._split_base = np.arange(n_trees) * n_splits
        self._leaf_base = np.arange(n_trees) * n_leaves - n_splits
        self._depth = int(np.log2(n_splits + 1))
        # The similarity from the mean shape to the current one has a closed form
        # (least squares over scaled rotations; dlib's find_similarity_transform).
        self._centred = self.initial - self.initial.mean(0)
        norm = float((self._centred ** 2).sum())
        self._fit_a = self._centred / norm
        self._fit_b = np.stack([-self._centred[:, 1], self._centred[:, 0]], axis=1) / norm

    def predict_batch(self, images: list[np.ndarray], boxes: np.ndarray) -> np.ndarray:
        """Landmarks for B boxes, each in its own image, walked together.

        Args:
            images: B (H, W, 3) uint8 RGB images (the same one may repeat);
                intensities are ``floor((R+G+B)/3)`` as dlib computes them, taken
                only at the pixels sampled.
            boxes: (B, 4) integer face rectangles (left, top, right, bottom).

        Returns:
            (B, P, 2) float landmark coordinates, each in its image, unrounded
            (dlib rounds them to whole pixels; sub-pixel landmarks give a
            steadier alignment: +0.1 point of LFW accuracy with the same models).
        """
        boxes = np.asarray(boxes, dtype=np.float64)
        n = len(boxes)
        scale = (boxes[:, 2:] - boxes[:, :2])[:, None, :]  # (B, 1, 2)
        origin = boxes[:, None, :2]
        current = np.repeat(self.initial[None], n, axis=0)  # (B, P, 2)
        # Every image's pixels in one flat buffer (an image repeated for several
        # faces is stored once), so that each cascade samples all faces at once.
        unique: dict[int, int] = {}
        for image in images:
            unique.setdefault(id(image), len(unique))
        stored = list({id(image): image for image in images}.values())
        flat = np.concatenate([image.reshape(-1) for image in stored])
        starts = np.cumsum([0] + [image.size for image in stored[:-1]])
        which = np.array([unique[id(image)] for image in images])
        start = starts[which][:, None]
        height = np.array([image.shape[0] for image in images])[:, None]
        width = np.array([image.shape[1] for image in images])[:, None]
        n_feats = self.anchor_idx.shape[1]
        row = (np.arange(n) * n_feats)[:, None]
        for c in range(len(self.split_a)):
            d = current - current.mean(axis=1, keepdims=True)
            # dlib keeps the transform in float32
            a = (d * self._fit_a).sum(axis=(1, 2)).astype(np.float32).astype(np.float64)
            b = (d * self._fit_b).sum(axis=(1, 2)).astype(np.float32).astype(np.float64)
            anchors = current[:, self.anchor_idx[c]]
            dx, dy = self.deltas[c][:, 0], self.deltas[c][:, 1]
            px = anchors[..., 0] + (a[:, None] * dx - b[:, None] * dy)
            py = anchors[..., 1] + (b[:, None] * dx + a[:, None] * dy)
            x = np.floor(px * scale[..., 0] + origin[..., 0] + 0.5).astype(np.intp)
            y = np.floor(py * scale[..., 1] + origin[..., 1] + 0.5).astype(np.intp)
            inside = (x >= 0) & (y >= 0) & (x < width) & (y < height)
            at = np.where(inside, start + (y * width + x) * 3, 0)
            grey = (flat.take(at).astype(np.uint16) + flat.take(at + 1) + flat.take(at + 2)) // 3
            feats = np.where(inside, grey, 0).astype(np.float32).ravel()
            node = np.zeros((n, len(self._split_base)), dtype=np.intp)
            for _ in range(self._depth):
                at = self._split_base + node
                diff = (feats.take(row + self.split_a[c].take(at))
                        - feats.take(row + self.split_b[c].take(at)))
                node = 2 * node + 2 - (diff > self.thresholds[c].take(at))
            step = self.leaves[c].take(self._leaf_base + node, axis=0).sum(axis=1,
                                                                          dtype=np.float64)
            current = current + step.reshape(current.shape)
        points: np.ndarray = current * scale + origin
        return points
