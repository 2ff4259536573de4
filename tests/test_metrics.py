"""Tests for edgeseg.metrics on shapes with hand-derived expected values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from edgeseg.metrics import (
    METRIC_NAMES,
    MetricAccumulator,
    accuracy,
    boundary_fscore,
    confusion_counts,
    dice,
    hd95,
    iou,
    mask_boundary,
    mask_dice,
    segmentation_metrics,
    sensitivity,
    specificity,
    summarize,
)


def square(h, w, r0, c0, side):
    m = np.zeros((h, w), dtype=bool)
    m[r0:r0 + side, c0:c0 + side] = True
    return m


def disk(h, w, cy, cx, radius):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2


def blobs(seed, b=6, h=48, w=40):
    """Random smooth-ish binary blobs (thresholded blurred noise)."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((b, h, w)), sigma=(0, 4, 4))
    return noise > 0.05


# ------------------------------------------------------------------- overlap metrics

def test_two_squares_known_overlap():
    # two 10x10 squares overlapping on a 5x5 block: TP=25, FP=FN=75
    a = square(32, 32, 2, 2, 10)
    b = square(32, 32, 7, 7, 10)
    assert (a & b).sum() == 25
    assert dice(a[None], b[None]).item() == pytest.approx(50 / 200, abs=1e-12)
    assert iou(a[None], b[None]).item() == pytest.approx(25 / 175, abs=1e-12)
    c = confusion_counts(a[None], b[None])
    assert [c[k].item() for k in ("tp", "fp", "fn", "tn")] == [25, 75, 75, 32 * 32 - 175]



def test_one_dice_behind_every_alias():
    """metrics.dice, metrics.mask_dice, baselines.dice and mobile.sidecar.dice_masks agree
    exactly (one implementation), empty pairs included, and mask_dice keeps the device."""
    from edgeseg.baselines import dice as np_dice
    from edgeseg.mobile.sidecar import dice_masks

    rng = np.random.default_rng(0)
    a = rng.random((6, 9, 11)) < rng.random((6, 1, 1))
    b = rng.random((6, 9, 11)) < rng.random((6, 1, 1))
    a[0], b[0] = False, False  # both empty -> 1
    a[1] = False  # one empty -> 0
    b[1, 0, 0] = True
    want = dice(a, b)
    assert want[0].item() == 1.0 and want[1].item() == 0.0 and want.dtype == torch.float64
    assert torch.equal(mask_dice(a, b), want)
    assert torch.equal(dice_masks(torch.from_numpy(a)[:, None], torch.from_numpy(b)[:, None]), want)
    assert [np_dice(x.astype(np.uint8) * 255, y) for x, y in zip(a, b)] == want.tolist()
    assert mask_dice(torch.from_numpy(a).to("meta"), torch.from_numpy(b).to("meta")).device.type == "meta"

def test_se_sp_acc_hand_made_4x4():
    target = np.array([[1, 1, 0, 0],
                       [1, 1, 0, 0],
                       [0, 0, 0, 0],
                       [0, 0, 0, 0]])
    pred = np.array([[1, 0, 0, 0],
                     [1, 1, 1, 0],
                     [0, 0, 0, 0],
                     [0, 0, 0, 0]])
    # TP=3 (0,0),(1,0),(1,1); FN=1 (0,1); FP=1 (1,2); TN=11
    m = segmentation_metrics(pred[None], target[None])
    assert m["se"].item() == pytest.approx(3 / 4, abs=1e-12)
    assert m["sp"].item() == pytest.approx(11 / 12, abs=1e-12)
    assert m["acc"].item() == pytest.approx(14 / 16, abs=1e-12)
    assert m["dsc"].item() == pytest.approx(6 / 8, abs=1e-12)
    assert m["iou"].item() == pytest.approx(3 / 5, abs=1e-12)
    assert sensitivity(pred, target).item() == pytest.approx(3 / 4)
    assert specificity(pred, target).item() == pytest.approx(11 / 12)
    assert accuracy(pred, target).item() == pytest.approx(14 / 16)


# ------------------------------------------------------------------ boundary metrics

@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("axis", [0, 1])
def test_pure_shift_hd95_equals_shift(k, axis):
    a = square(64, 64, 12, 12, 20)
    b = np.roll(a, k, axis=axis)
    assert hd95(a[None], b[None]).item() == pytest.approx(k, abs=1e-9)
    assert hd95(b[None], a[None]).item() == pytest.approx(k, abs=1e-9)


def test_shift_boundary_fscore_hand_derived():
    # Side s=20 square shifted by k=3 columns. Boundary has 4s-4 = 76 pixels. Pixels of the
    # first square's boundary farther than 2 px from the second's: the whole left edge (s = 20)
    # and the right-edge pixels at least 3 rows from the top and bottom rows (s - 6 = 14).
    # Precision = recall = (76 - 34) / 76 = 21/38, hence F = 21/38.
    a = square(64, 64, 12, 12, 20)
    b = np.roll(a, 3, axis=1)
    assert boundary_fscore(a[None], b[None], tol=2).item() == pytest.approx(21 / 38, abs=1e-12)
    assert boundary_fscore(a[None], b[None], tol=3).item() == pytest.approx(1.0)
    assert boundary_fscore(a[None], b[None], tol=0).item() == pytest.approx(
        # on-boundary pixels at distance 0: top and bottom edges minus the first k columns
        2 * (20 - 3) / 76, abs=1e-12)


def test_single_pixels_hd95_is_their_distance():
    a = np.zeros((1, 20, 20), bool)
    b = np.zeros((1, 20, 20), bool)
    a[0, 2, 3] = True
    b[0, 5, 7] = True  # 3-4-5 triangle
    assert hd95(a, b).item() == pytest.approx(5.0)
    assert boundary_fscore(a, b).item() == 0.0
    assert boundary_fscore(a, b, tol=5).item() == 1.0


def test_hd95_matches_brute_force():
    pred, target = blobs(0), blobs(1)
    got = hd95(pred, target)
    for i in range(pred.shape[0]):
        bp = np.argwhere(pred[i] & ~ndimage.binary_erosion(pred[i]))
        bg = np.argwhere(target[i] & ~ndimage.binary_erosion(target[i]))
        d = cdist(bp, bg)
        expected = np.percentile(np.concatenate([d.min(1), d.min(0)]), 95)
        assert got[i].item() == pytest.approx(expected, abs=1e-9)


def test_boundary_is_inner_4_contour_and_image_edge_counts():
    m = square(6, 6, 1, 1, 4)
    b = mask_boundary(m)
    assert b.sum() == 4 * 4 - 4 and not b[2:4, 2:4].any()
    full = np.ones((5, 5), bool)
    assert mask_boundary(full).sum() == 16  # frame of the image


def test_disk_vs_itself_is_perfect():
    d = disk(64, 64, 30, 33, 17)
    m = segmentation_metrics(d[None], d[None])
    assert set(m) == set(METRIC_NAMES)
    for k in ("dsc", "iou", "se", "sp", "acc", "bf"):
        assert m[k].item() == 1.0, k
    assert m["hd95"].item() == 0.0


# ------------------------------------------------------------------------ empty cases

def test_both_empty():
    z = np.zeros((1, 1, 16, 24), dtype=np.uint8)
    m = segmentation_metrics(z, z)
    assert {k: v.item() for k, v in m.items()} == {
        "dsc": 1.0, "iou": 1.0, "se": 1.0, "sp": 1.0, "acc": 1.0, "hd95": 0.0, "bf": 1.0}


def test_exactly_one_empty():
    z = np.zeros((16, 24), bool)
    s = square(16, 24, 3, 4, 5)
    diag = math.hypot(16, 24)
    for pred, target in ((z, s), (s, z)):
        m = segmentation_metrics(pred[None], target[None])
        assert m["dsc"].item() == 0.0 and m["iou"].item() == 0.0
        assert m["bf"].item() == 0.0
        assert m["hd95"].item() == pytest.approx(diag)
        assert all(math.isfinite(v.item()) for v in m.values())
    # empty prediction: every positive missed
    m = segmentation_metrics(z[None], s[None])
    assert m["se"].item() == 0.0 and m["sp"].item() == 1.0
    # empty target: nothing to miss (se = 1); the false positives lower sp
    m = segmentation_metrics(s[None], z[None])
    assert m["se"].item() == 1.0
    assert m["sp"].item() == pytest.approx(1 - 25 / (16 * 24))


def test_no_negatives_specificity_is_one():
    full = np.ones((1, 8, 8), bool)
    m = segmentation_metrics(full, full)
    assert m["sp"].item() == 1.0 and m["dsc"].item() == 1.0 and m["hd95"].item() == 0.0
    partial = full.copy()
    partial[0, :4] = False
    assert specificity(partial, full).item() == 1.0
    assert sensitivity(partial, full).item() == pytest.approx(0.5)


# ------------------------------------------------------------- batching and input types

def test_batch_matches_per_sample():
    pred, target = blobs(2), blobs(3)
    pred[1] = False  # include an empty-vs-nonempty and a both-empty sample
    pred[2] = target[2] = False
    batch = segmentation_metrics(pred, target)
    for k in METRIC_NAMES:
        assert batch[k].shape == (pred.shape[0],) and batch[k].dtype == torch.float64
    for i in range(pred.shape[0]):
        single = segmentation_metrics(pred[i:i + 1], target[i:i + 1])
        for k in METRIC_NAMES:
            assert batch[k][i].item() == pytest.approx(single[k].item(), abs=1e-12), (k, i)
    means = summarize(batch)
    assert set(means) == set(METRIC_NAMES)
    for k in METRIC_NAMES:
        assert isinstance(means[k], float)
        assert means[k] == pytest.approx(batch[k].mean().item())


def test_numpy_torch_and_layouts_agree():
    pred, target = blobs(4), blobs(5)
    ref = segmentation_metrics(pred, target)
    variants = [
        (torch.from_numpy(pred), torch.from_numpy(target)),                     # torch bool
        (pred.astype(np.uint8)[:, None], target.astype(np.float32)[:, None]),    # B x 1 x H x W
        (torch.from_numpy(pred).float()[:, None], torch.from_numpy(target).long()),
        (pred, torch.from_numpy(target)),                                        # mixed
    ]
    for p, t in variants:
        got = segmentation_metrics(p, t)
        for k in METRIC_NAMES:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-12)


def test_invalid_inputs_rejected():
    a = np.zeros((2, 8, 8), bool)
    with pytest.raises(ValueError, match="binary"):
        dice(np.full((1, 4, 4), 0.7), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="shapes differ"):
        dice(a, np.zeros((2, 8, 9), bool))
    with pytest.raises(ValueError, match="one channel"):
        dice(np.zeros((2, 3, 8, 8)), np.zeros((2, 3, 8, 8)))
    with pytest.raises(ValueError):
        segmentation_metrics(a, a, boundary_tol=-1)
    with pytest.raises(TypeError):
        dice([[0, 1]], [[0, 1]])


# ------------------------------------------------------------------------ accumulator

def test_accumulator_mean_std_across_batches():
    pred, target = blobs(6, b=7), blobs(7, b=7)
    acc = MetricAccumulator()
    first = acc.update_masks(pred[:3], target[:3])
    acc.update(segmentation_metrics(torch.from_numpy(pred[3:]), torch.from_numpy(target[3:])))
    assert acc.count == len(acc) == 7
    assert set(first) == set(METRIC_NAMES)
    full = segmentation_metrics(pred, target)
    res = acc.compute()
    for k in METRIC_NAMES:
        v = full[k].numpy()
        assert res[k]["mean"] == pytest.approx(v.mean(), abs=1e-12)
        assert res[k]["std"] == pytest.approx(v.std(), abs=1e-12)
        assert acc.std(ddof=1)[k] == pytest.approx(v.std(ddof=1), abs=1e-12)
        np.testing.assert_allclose(acc.per_sample()[k], v, atol=1e-12)
    assert acc.mean() == pytest.approx(summarize(full))
    acc.reset()
    assert acc.count == 0
    with pytest.raises(ValueError):
        acc.mean()


def test_accumulator_validates_batches():
    acc = MetricAccumulator()
    with pytest.raises(ValueError, match="different lengths"):
        acc.update({"dsc": torch.ones(3), "iou": torch.ones(2)})
    acc.update({"dsc": torch.ones(2), "iou": torch.zeros(2)})
    with pytest.raises(ValueError, match="names changed"):
        acc.update({"dsc": torch.ones(2)})
    acc.update({"dsc": [0.5], "iou": 0.25})
    assert acc.mean() == pytest.approx({"dsc": 2.5 / 3, "iou": 0.25 / 3})
