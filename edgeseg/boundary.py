"""Boundary distance maps and the time-dependent boundary attention of DermoSegDiff / EFKD.

The map is computed once per (augmented) mask in the data workers; the training step only
raises it to a per-sample power (`attention`). Semantics follow the authors' code (tests/golden/README.md)
bit for bit: OpenCV Canny(0, 0) contour, exact Euclidean distance transform, per-sample
min-max normalisation, the 1% rule.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

__all__ = ["distance_map", "attention", "t_power", "canny_edges"]

# OpenCV's own thread pool deadlocks in DataLoader workers forked after the parent used it
# (seen: the second epoch's worker hung). The maps are per-image and small: no threads needed.
cv2.setNumThreads(0)

# The reference computes `W * 1.1415 - D` before min-max normalising; the constant cancels
# but we keep it so float32 rounding matches the golden vectors to the last ulp.
_OFFSET = 1.1415


def _as_binary(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"distance_map expects an H x W mask, got shape {mask.shape}")
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    # 0/1, 0/255 and the model's -1/+1 form all map to lesion = positive values
    # after the reference's min-max rescaling; `> midpoint` expresses that without NaNs.
    lo, hi = float(mask.min()), float(mask.max())
    if hi == lo:
        return np.zeros(mask.shape, np.uint8) if hi <= 0 else np.ones(mask.shape, np.uint8)
    return (mask > (lo + hi) / 2).astype(np.uint8)


def canny_edges(mask01: np.ndarray) -> np.ndarray:
    """1-pixel contour of a 0/1 uint8 mask, as the reference computes it (Canny 0, 0)."""
    return (cv2.Canny(np.ascontiguousarray(mask01, dtype=np.uint8), 0, 0) > 0).astype(np.uint8)


def distance_map(mask: np.ndarray) -> np.ndarray:
    """Normalised inverse distance to the lesion contour, float32 H x W in [0, 1].

    1 on the contour, 0 at the pixel(s) farthest from it. All ones when the lesion covers at
    most 1% of the image (strictly more than W*W/100 pixels are needed) or when the mask has no
    contour at all (empty or full), never NaN.
    """
    m = _as_binary(mask)
    h, w = m.shape
    if not m.sum() > w * w / 100:
        return np.ones((h, w), np.float32)
    edges = canny_edges(m)
    if not edges.any():
        return np.ones((h, w), np.float32)
    dist = cv2.distanceTransform((1 - edges).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    # OpenCV's result can differ by 1 ulp with the output buffer's alignment; squared distances
    # between pixels are integers, so snap to the correctly rounded sqrt: deterministic maps.
    dist = np.sqrt(np.rint(dist.astype(np.float64) ** 2)).astype(np.float32)
    tmp = np.float32(w * _OFFSET) - dist
    lo, hi = tmp.min(), tmp.max()
    if hi == lo:  # every pixel is contour
        return np.ones((h, w), np.float32)
    return ((tmp - lo) / (hi - lo)).astype(np.float32)


def t_power(t: torch.Tensor, T: int, gamma: float) -> torch.Tensor:
    """Exponent t_p = (gamma * (T - t) / T) ** gamma in float64, rounded to float32."""
    t64 = t.to(torch.float64)
    return ((gamma * (T - t64)) / T).pow(gamma).to(torch.float32)


def attention(d: torch.Tensor, t: torch.Tensor, T: int, gamma: float) -> torch.Tensor:
    """Boundary attention `d ** t_p` per sample (B x 1 x H x W), with 0 ** 0 = 1."""
    tp = t_power(t.to(d.device), T, gamma).view(-1, *([1] * (d.dim() - 1)))
    # torch.pow already defines 0 ** 0 = 1, matching the reference's numpy/torch convention.
    return d.float().pow(tp)
