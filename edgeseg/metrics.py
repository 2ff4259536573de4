"""Segmentation metrics for binary lesion masks.

The paper's Table I reports DSC, sensitivity (SE), specificity (SP) and accuracy (ACC) on
the thresholded mask; we add IoU, HD95 and a boundary F-score because EFKD is about the
boundary.

Inputs
------
Every function takes ``pred`` and ``target`` as torch tensors or numpy arrays of shape
``B x 1 x H x W`` or ``B x H x W`` (a single ``H x W`` mask is read as a batch of one),
with dtype bool or numeric values in {0, 1}. Predictions must already be thresholded:
any other value raises ``ValueError`` rather than being thresholded silently. Every
function returns one value per sample as a float64 CPU tensor of shape ``(B,)``.

Definitions (per sample, TP/FP/FN/TN counted over the H x W pixels)
-------------------------------------------------------------------
- ``dsc``  = 2 TP / (2 TP + FP + FN)
- ``iou``  = TP / (TP + FP + FN)
- ``se``   = TP / (TP + FN)            (sensitivity, recall)
- ``sp``   = TN / (TN + FP)            (specificity)
- ``acc``  = (TP + TN) / (H W)
- ``hd95`` = 95th percentile of the pooled boundary-to-boundary distances in both
  directions (the medpy ``hd95`` definition): the distance from every boundary pixel of
  ``pred`` to the nearest boundary pixel of ``target`` and vice versa, exact Euclidean,
  in pixels, percentile with numpy's linear interpolation.
- ``bf``   = boundary F-score (DAVIS / BF-score): precision = fraction of ``pred``
  boundary pixels within ``boundary_tol`` pixels (Euclidean, inclusive) of the ``target``
  boundary, recall = the same with the roles swapped, F = 2PR / (P + R) (0 if P + R = 0).

The boundary of a mask is its inner contour: foreground pixels with at least one
4-neighbour in the background, where pixels outside the image count as background (so a
mask touching the image edge has a boundary along that edge). A mask has an empty
boundary exactly when it is empty.

Empty-mask conventions (no NaN is ever produced)
------------------------------------------------
- both masks empty: dsc = iou = 1, se = 1 (no positives to miss), hd95 = 0, bf = 1;
  sp = acc = 1 as computed.
- exactly one mask empty: dsc = iou = 0, bf = 0, and hd95 = the image diagonal
  ``sqrt(H**2 + W**2)``, a finite value larger than any distance inside the image.
- se whenever the target has no positive pixel = 1 (including an empty target with a
  non-empty prediction: the false positives show up in sp, dsc and iou, not in se).
- sp whenever the target has no negative pixel = 1.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Union

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "segmentation_metrics",
    "summarize",
    "confusion_counts",
    "dice",
    "mask_dice",
    "iou",
    "sensitivity",
    "specificity",
    "accuracy",
    "hd95",
    "boundary_fscore",
    "mask_boundary",
    "MetricAccumulator",
    "METRIC_NAMES",
]

MaskLike = Union[torch.Tensor, np.ndarray]

#: Keys of :func:`segmentation_metrics`, in reporting order.
METRIC_NAMES = ("dsc", "iou", "se", "sp", "acc", "hd95", "bf")

_DTYPE = torch.float64


# --------------------------------------------------------------------------- inputs

def _to_bool_batch(mask: MaskLike, name: str) -> torch.Tensor:
    """Return a CPU ``B x H x W`` bool tensor, validating shape and binary values."""
    if isinstance(mask, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(mask))
    elif isinstance(mask, torch.Tensor):
        t = mask.detach()
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(mask).__name__}")
    if t.ndim == 2:
        t = t.unsqueeze(0)
    elif t.ndim == 4:
        if t.shape[1] != 1:
            raise ValueError(f"{name} must have one channel (B x 1 x H x W), got shape {tuple(t.shape)}")
        t = t[:, 0]
    elif t.ndim != 3:
        raise ValueError(f"{name} must be B x 1 x H x W, B x H x W or H x W, got shape {tuple(t.shape)}")
    if t.dtype != torch.bool:
        if t.is_complex():
            raise ValueError(f"{name} must be a binary mask, got complex dtype {t.dtype}")
        nonzero = t != 0
        if bool(((t != 1) & nonzero).any()):
            raise ValueError(
                f"{name} must be binary (bool or values in {{0, 1}}); threshold probabilities "
                "or logits before computing metrics"
            )
        t = nonzero
    return t.cpu()


def _pair(pred: MaskLike, target: MaskLike) -> tuple[torch.Tensor, torch.Tensor]:
    p = _to_bool_batch(pred, "pred")
    g = _to_bool_batch(target, "target")
    if p.shape != g.shape:
        raise ValueError(f"pred and target shapes differ after squeezing the channel: "
                         f"{tuple(p.shape)} vs {tuple(g.shape)}")
    return p, g


# ------------------------------------------------------------ confusion-matrix metrics

def confusion_counts(pred: MaskLike, target: MaskLike) -> dict[str, torch.Tensor]:
    """Per-sample pixel counts ``tp``, ``fp``, ``fn``, ``tn`` (float64, shape ``(B,)``)."""
    p, g = _pair(pred, target)
    return _counts(p, g)


def _counts(p: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    dims = (1, 2)
    tp = (p & g).sum(dims).to(_DTYPE)
    fp = (p & ~g).sum(dims).to(_DTYPE)
    fn = (~p & g).sum(dims).to(_DTYPE)
    n = float(p.shape[1] * p.shape[2])
    tn = n - tp - fp - fn
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _ratio(num: torch.Tensor, den: torch.Tensor, when_zero: float) -> torch.Tensor:
    """num / den, with ``when_zero`` where den == 0 (no NaN, no warning)."""
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.full_like(num, when_zero))


def _dice_ratio(inter: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """2 |P & G| / (|P| + |G|) from the intersection and the summed sizes; total == 0 only
    when both masks are empty -> 1."""
    return _ratio(2 * inter, total, 1.0)


def _confusion_metrics(c: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    return {
        "dsc": _dice_ratio(tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn, 1.0),
        "se": _ratio(tp, tp + fn, 1.0),
        "sp": _ratio(tn, tn + fp, 1.0),
        "acc": _ratio(tp + tn, tp + fp + fn + tn, 1.0),
    }


def dice(pred: MaskLike, target: MaskLike) -> torch.Tensor:
    """Per-sample Dice similarity coefficient (DSC); 1 if both masks are empty."""
    return mask_dice(*_pair(pred, target))


def mask_dice(a: MaskLike, b: MaskLike) -> torch.Tensor:
    """Per-sample Dice of two mask batches ``B x ...`` of one shape, nonzero = foreground,
    without :func:`dice`'s checks: float64 ``(B,)`` on the masks' device (a numpy pair gives a
    CPU tensor); 1 if both masks are empty.

    The one Dice of the package: :func:`dice`, ``edgeseg.baselines.dice`` and
    ``edgeseg.mobile.sidecar.dice_masks`` all compute it here.
    """
    a, b = (torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x for x in (a, b))
    a = a.reshape(a.shape[0], -1).bool()
    b = b.reshape(b.shape[0], -1).bool()
    inter = (a & b).sum(1).to(_DTYPE)
    return _dice_ratio(inter, (a.sum(1) + b.sum(1)).to(_DTYPE))


def iou(pred: MaskLike, target: MaskLike) -> torch.Tensor:
    """Per-sample intersection over union (Jaccard); 1 if both masks are empty."""
    return _confusion_metrics(confusion_counts(pred, target))["iou"]


def sensitivity(pred: MaskLike, target: MaskLike) -> torch.Tensor:
    """Per-sample sensitivity TP/(TP+FN); 1 if the target has no positive pixel."""
    return _confusion_metrics(confusion_counts(pred, target))["se"]


def specificity(pred: MaskLike, target: MaskLike) -> torch.Tensor:
    """Per-sample specificity TN/(TN+FP); 1 if the target has no negative pixel."""
    return _confusion_metrics(confusion_counts(pred, target))["sp"]


def accuracy(pred: MaskLike, target: MaskLike) -> torch.Tensor:
    """Per-sample pixel accuracy (TP+TN)/(H*W)."""
    return _confusion_metrics(confusion_counts(pred, target))["acc"]


# ------------------------------------------------------------------ boundary metrics

def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """Inner contour of a bool ``H x W`` (or ``B x H x W``) mask.

    A pixel is on the boundary if it is foreground and at least one of its 4-neighbours is
    background; pixels outside the image count as background.
    """
    m = np.asarray(mask, dtype=bool)
    pad = [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)]
    q = np.pad(m, pad, constant_values=False)
    interior = (q[..., :-2, 1:-1] & q[..., 2:, 1:-1] & q[..., 1:-1, :-2] & q[..., 1:-1, 2:])
    return m & ~interior


def _distances_to(boundary_from: np.ndarray, boundary_to: np.ndarray) -> np.ndarray:
    """Euclidean distance from each pixel of ``boundary_from`` to the nearest of ``boundary_to``.

    Both must be non-empty.
    """
    dt = ndimage.distance_transform_edt(~boundary_to)
    return dt[boundary_from]


def _boundary_values(p: torch.Tensor, g: torch.Tensor, tol: float | None,
                     want_hd: bool, want_bf: bool) -> tuple[torch.Tensor, torch.Tensor]:
    pn = p.numpy()
    gn = g.numpy()
    bp_all = mask_boundary(pn)
    bg_all = mask_boundary(gn)
    b, h, w = pn.shape
    diag = math.hypot(h, w)
    hd = np.zeros(b, dtype=np.float64)
    bf = np.zeros(b, dtype=np.float64)
    for i in range(b):
        bp, bg = bp_all[i], bg_all[i]
        has_p, has_g = bool(bp.any()), bool(bg.any())
        if not has_p and not has_g:
            hd[i], bf[i] = 0.0, 1.0
            continue
        if has_p != has_g:
            hd[i], bf[i] = diag, 0.0
            continue
        d_pg = _distances_to(bp, bg)  # pred boundary -> target boundary
        d_gp = _distances_to(bg, bp)  # target boundary -> pred boundary
        if want_hd:
            hd[i] = float(np.percentile(np.concatenate([d_pg, d_gp]), 95))
        if want_bf:
            precision = float(np.mean(d_pg <= tol))
            recall = float(np.mean(d_gp <= tol))
            s = precision + recall
            bf[i] = 2 * precision * recall / s if s > 0 else 0.0
    return torch.from_numpy(hd), torch.from_numpy(bf)


def _check_tol(tol: float) -> float:
    tol = float(tol)
    if not tol >= 0:
        raise ValueError(f"boundary tolerance must be >= 0 pixels, got {tol}")
    return tol


def hd95(pred: MaskLike, target: MaskLike) -> torch.Tensor:
    """Per-sample 95th-percentile symmetric Hausdorff distance between boundaries, in pixels.

    0 if both masks are empty; the image diagonal ``sqrt(H**2 + W**2)`` if exactly one is.
    """
    p, g = _pair(pred, target)
    return _boundary_values(p, g, None, want_hd=True, want_bf=False)[0]


def boundary_fscore(pred: MaskLike, target: MaskLike, tol: float = 2) -> torch.Tensor:
    """Per-sample boundary F-score with a tolerance of ``tol`` pixels (inclusive).

    1 if both masks are empty, 0 if exactly one is.
    """
    tol = _check_tol(tol)
    p, g = _pair(pred, target)
    return _boundary_values(p, g, tol, want_hd=False, want_bf=True)[1]


# ----------------------------------------------------------------------- all at once

def segmentation_metrics(pred: MaskLike, target: MaskLike,
                         boundary_tol: float = 2) -> dict[str, torch.Tensor]:
    """All per-sample metrics: keys ``dsc, iou, se, sp, acc, hd95, bf`` -> float64 ``(B,)``."""
    tol = _check_tol(boundary_tol)
    p, g = _pair(pred, target)
    out = _confusion_metrics(_counts(p, g))
    out["hd95"], out["bf"] = _boundary_values(p, g, tol, want_hd=True, want_bf=True)
    return out


def summarize(per_sample: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, float]:
    """Mean of each per-sample metric (e.g. the output of :func:`segmentation_metrics`)."""
    out = {}
    for k, v in per_sample.items():
        a = _as_1d(v, k)
        if a.size == 0:
            raise ValueError(f"metric {k!r} has no samples")
        out[k] = float(a.mean())
    return out


def _as_1d(v, name: str) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().to(_DTYPE).numpy()
    a = np.asarray(v, dtype=np.float64)
    if a.ndim > 1:
        raise ValueError(f"metric {name!r} must be a scalar or a 1-D array of per-sample values, "
                         f"got shape {a.shape}")
    return a.reshape(-1)


class MetricAccumulator:
    """Collects per-sample metric values over batches; reports mean and std per metric.

    >>> acc = MetricAccumulator()
    >>> for pred, target in loader:            # doctest: +SKIP
    ...     acc.update_masks(pred, target)      # or acc.update(segmentation_metrics(...))
    >>> acc.compute()                           # doctest: +SKIP
    {'dsc': {'mean': 0.91, 'std': 0.05}, ...}

    ``std`` is the population standard deviation (``ddof=0``) over all samples seen unless
    another ``ddof`` is asked for; with a single sample and ``ddof >= 1`` it is 0.
    """

    def __init__(self, boundary_tol: float = 2):
        self.boundary_tol = _check_tol(boundary_tol)
        self._values: dict[str, list[np.ndarray]] = {}
        self._count = 0

    def reset(self) -> None:
        self._values = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def count(self) -> int:
        """Number of samples collected so far."""
        return self._count

    def update(self, per_sample: Mapping[str, torch.Tensor | np.ndarray | float]) -> None:
        """Add one batch of per-sample values (every metric must have the same length,
        and the same set of metrics as earlier batches)."""
        arrays = {k: _as_1d(v, k) for k, v in per_sample.items()}
        if not arrays:
            return
        lengths = {a.size for a in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"per-sample metrics have different lengths: "
                             f"{ {k: a.size for k, a in arrays.items()} }")
        if self._values and set(arrays) != set(self._values):
            raise ValueError(f"metric names changed between batches: "
                             f"{sorted(self._values)} vs {sorted(arrays)}")
        for k, a in arrays.items():
            self._values.setdefault(k, []).append(a)
        self._count += lengths.pop()

    def update_masks(self, pred: MaskLike, target: MaskLike) -> dict[str, torch.Tensor]:
        """Compute :func:`segmentation_metrics` on a batch, add it, and return it."""
        values = segmentation_metrics(pred, target, boundary_tol=self.boundary_tol)
        self.update(values)
        return values

    def per_sample(self) -> dict[str, np.ndarray]:
        """All collected values, concatenated: metric -> float64 array of length ``count``."""
        return {k: np.concatenate(v) for k, v in self._values.items()}

    def mean(self) -> dict[str, float]:
        self._require_samples()
        return {k: float(v.mean()) for k, v in self.per_sample().items()}

    def std(self, ddof: int = 0) -> dict[str, float]:
        self._require_samples()
        return {k: float(v.std(ddof=ddof)) if v.size > ddof else 0.0
                for k, v in self.per_sample().items()}

    def compute(self, ddof: int = 0) -> dict[str, dict[str, float]]:
        """``{metric: {"mean": m, "std": s}}`` over all samples collected."""
        means, stds = self.mean(), self.std(ddof)
        return {k: {"mean": means[k], "std": stds[k]} for k in means}

    def _require_samples(self) -> None:
        if self._count == 0:
            raise ValueError("MetricAccumulator has no samples yet")
