"""Geometry shared by the detectors and aligners: similarity fits, warps, NMS."""

from __future__ import annotations

import numpy as np
from PIL import Image


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity (rotation, uniform scale, translation) src -> dst.

    Args:
        src, dst: (P, 2) point sets, P >= 2.

    Returns:
        (A, t) with ``dst ~= src @ A.T + t``; A is 2x2 (scaled rotation).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    var_s = (s_c**2).sum() / len(src)
    cov = d_c.T @ s_c / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(cov) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    scale = (d * np.diag(sign)).sum() / var_s if var_s > 0 else 1.0
    a = scale * rot
    return a, mu_d - a @ mu_s


def warp_bilinear(image: np.ndarray, a: np.ndarray, t: np.ndarray, out_h: int, out_w: int,
                  truncate: bool) -> np.ndarray:
    """Sample an output image whose pixel (u, v) comes from ``a @ (u, v) + t`` in ``image``.

    Bilinear interpolation; output pixels whose 2x2 source neighbourhood leaves
    the image are black (0), as in dlib's ``extract_image_chip``.

    Args:
        image: (H, W, C) uint8 or float array.
        a, t: the 2x2 matrix and translation mapping output to input coordinates.
        truncate: truncate to uint8 (dlib) instead of rounding.
    """
    h, w = image.shape[:2]
    if truncate and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return _warp_pillow(image, a, t, out_h, out_w)
    x, y, x0, y0, inside = _sample_grid(a, t, out_h, out_w, h, w)
    x0c = np.clip(x0, 0, w - 2)
    y0c = np.clip(y0, 0, h - 2)
    fx = (x - x0)[..., None]
    fy = (y - y0)[..., None]
    # Gather first, convert after: only the sampled pixels become float64.
    tl = image[y0c, x0c].astype(np.float64)
    tr = image[y0c, x0c + 1].astype(np.float64)
    bl = image[y0c + 1, x0c].astype(np.float64)
    br = image[y0c + 1, x0c + 1].astype(np.float64)
    out = (1 - fy) * ((1 - fx) * tl + fx * tr) + fy * ((1 - fx) * bl + fx * br)
    out[~inside] = 0
    pixels: np.ndarray = np.clip(out if truncate else np.rint(out), 0, 255).astype(np.uint8)
    return pixels


def _sample_grid(a: np.ndarray, t: np.ndarray, out_h: int, out_w: int, h: int, w: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source coordinates of every output pixel, their floors, and which of them
    have their 2x2 neighbourhood inside an (h, w) image."""
    v, u = np.mgrid[0:out_h, 0:out_w].astype(np.float64)
    x = a[0, 0] * u + a[0, 1] * v + t[0]
    y = a[1, 0] * u + a[1, 1] * v + t[1]
    x0 = np.floor(x).astype(np.int64)
    y0 = np.floor(y).astype(np.int64)
    inside = (x0 >= 0) & (y0 >= 0) & (x0 + 1 < w) & (y0 + 1 < h)
    return x, y, x0, y0, inside


def _warp_pillow(image: np.ndarray, a: np.ndarray, t: np.ndarray, out_h: int, out_w: int
                 ) -> np.ndarray:
    """:func:`warp_bilinear` of a uint8 RGB image, truncated, by Pillow's affine
    bilinear sampling in C, which gives the same values (its pixel centres sit at
    +0.5: the map is shifted by half a pixel); only the border rule differs.

    Only the image's part under the chip is handed to Pillow, and the border
    rule (black where a 2x2 neighbourhood leaves the image) is applied only when
    a corner of the chip falls outside: the sampled region is a parallelogram,
    so when its four corners are inside, every pixel is.
    """
    h, w = image.shape[:2]
    corners = np.array([[0, 0], [out_w - 1, 0], [0, out_h - 1], [out_w - 1, out_h - 1]],
                       dtype=np.float64)
    src = corners @ a.T + t
    cx0 = max(int(np.floor(src[:, 0].min())) - 1, 0)
    cy0 = max(int(np.floor(src[:, 1].min())) - 1, 0)
    cx1 = min(int(np.floor(src[:, 0].max())) + 3, w)
    cy1 = min(int(np.floor(src[:, 1].max())) + 3, h)
    if cx0 >= cx1 or cy0 >= cy1:  # the chip lies wholly outside the image
        return np.zeros((out_h, out_w, 3), dtype=np.uint8)
    crop = image[cy0:cy1, cx0:cx1]
    c = t[0] - cx0 + 0.5 - 0.5 * (a[0, 0] + a[0, 1])
    f = t[1] - cy0 + 0.5 - 0.5 * (a[1, 0] + a[1, 1])
    sampled = np.array(Image.fromarray(np.ascontiguousarray(crop)).transform(
        (out_w, out_h), Image.Transform.AFFINE,
        (a[0, 0], a[0, 1], c, a[1, 0], a[1, 1], f), resample=Image.Resampling.BILINEAR))
    floors = np.floor(src)
    if not ((floors >= 0).all() and (floors[:, 0] + 1 < w).all()
            and (floors[:, 1] + 1 < h).all()):
        sampled[~_sample_grid(a, t, out_h, out_w, h, w)[4]] = 0
    return sampled


def fit_within(image: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """``image`` resized (bilinear) so that its longer side is ``side``, and the scale.

    Pillow's bilinear resize widens its filter when shrinking: no aliasing.
    """
    h, w = image.shape[:2]
    scale = side / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR)), scale


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (4,) box against (N, 4) boxes, all as (x0, y0, x1, y1)."""
    ix0 = np.maximum(box[0], boxes[:, 0])
    iy0 = np.maximum(box[1], boxes[:, 1])
    ix1 = np.minimum(box[2], boxes[:, 2])
    iy1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return np.asarray(inter / np.maximum(area + areas - inter, 1e-9))


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best score first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        order = rest[iou(boxes[i], boxes[rest]) <= threshold]
    return np.asarray(keep, dtype=np.int64)
