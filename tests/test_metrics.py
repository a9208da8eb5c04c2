"""ambisam.metrics: every function against hand-worked cases, the MONAI metrics and one Ignite handler.

Masks are tiny 1D "images" of 4 pixels (any spatial shape is accepted) so that every value can be worked by hand;
the working is in the comments. Names: A = [1,1,0,0], B = [1,0,0,0], C = [0,0,1,1], E = [0,0,0,0] (empty).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ambisam.metrics import (
    DiceMaxHandler,
    DiceMaxMetric,
    DiceMeanMetric,
    ECEMetric,
    GEDHandler,
    GEDMetric,
    HMIoUMetric,
    NCCMetric,
    SampleDiversityMetric,
    SoftDiceMetric,
    dice_max,
    dice_mean,
    ece,
    empty_fractions,
    ged,
    hm_iou,
    ncc,
    pairwise_dice,
    pairwise_iou,
    sample_diversity,
    soft_dice,
)
from ambisam.metrics import functional

A = [1, 1, 0, 0]
B = [1, 0, 0, 0]
C = [0, 0, 1, 1]
E = [0, 0, 0, 0]


def masks(*rows):
    return np.array(rows, dtype=bool)


# ---------------------------------------------------------------------------------------------- pairwise matrices


def test_pairwise_iou_and_dice_by_hand():
    # IoU(A, B) = |{0}| / |{0, 1}| = 1/2; IoU(A, C) = 0; IoU(E, E) = empty_score; IoU(E, A) = 0 / 2 = 0.
    iou = pairwise_iou(masks(A, E), masks(B, C, E))
    np.testing.assert_allclose(iou, [[0.5, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert pairwise_iou(masks(E), masks(E), empty_score=0.0)[0, 0] == 0.0
    # Dice(A, B) = 2 * 1 / (2 + 1) = 2/3.
    np.testing.assert_allclose(pairwise_dice(masks(A, E), masks(B, E)), [[2 / 3, 0.0], [0.0, 1.0]])


def test_overlaps_are_counted_the_same_across_chunks(monkeypatch):
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 7, 5)) > 0.5, rng.random((4, 7, 5)) > 0.5
    full = pairwise_iou(a, b)
    monkeypatch.setattr(functional, "_CHUNK", 4)  # 35 pixels -> 9 chunks
    np.testing.assert_array_equal(pairwise_iou(a, b), full)
    # and against a direct count for one pair
    inter, union = (a[1] & b[2]).sum(), (a[1] | b[2]).sum()
    assert full[1, 2] == inter / union


# --------------------------------------------------------------------------------------------------------- GED


def test_ged_and_diversity_by_hand():
    # samples {A, B}, raters {A, C}.
    # d(S, Y): d(A, A) = 0, d(A, C) = 1, d(B, A) = 1 - 1/2 = 1/2, d(B, C) = 1  -> mean 2.5 / 4 = 0.625
    # d(S, S'): 0, 1/2, 1/2, 0 -> 1/4;  d(Y, Y'): 0, 1, 1, 0 -> 1/2
    # GED^2 = 2 * 0.625 - 0.25 - 0.5 = 0.5
    assert ged(masks(A, B), masks(A, C)) == pytest.approx(0.5)
    assert sample_diversity(masks(A, B)) == pytest.approx(0.25)


def test_ged_any_spatial_dims_and_torch_input():
    s, r = masks(A, B), masks(A, C)
    assert ged(s.reshape(2, 1, 2, 2), r.reshape(2, 1, 2, 2)) == pytest.approx(0.5)  # 3D
    assert ged(s.reshape(2, 2, 2), r.reshape(2, 2, 2)) == pytest.approx(0.5)  # 2D
    assert ged(torch.tensor(s, dtype=torch.uint8), torch.tensor(r)) == pytest.approx(0.5)
    assert ged(s.astype(np.float32), r.astype(np.int64)) == pytest.approx(0.5)


@pytest.mark.parametrize("both_empty, expected", [(0.0, 1.75), (1.0, 0.75)])
def test_ged_all_raters_empty(both_empty, expected):
    # samples {A, B}, raters {E, E}: d(S, Y) = 1 for all 4 pairs (one side non-empty: IoU 0) -> 1
    # d(S, S') = 1/4 as above; d(Y, Y') = both_empty for all 4 pairs.
    # GED^2 = 2 - 1/4 - both_empty = 1.75 (both_empty 0) or 0.75 (both_empty 1)
    assert ged(masks(A, B), masks(E, E), both_empty=both_empty) == pytest.approx(expected)


@pytest.mark.parametrize("both_empty, expected", [(0.0, 1.5), (1.0, 0.5)])
def test_ged_all_samples_empty(both_empty, expected):
    # samples {E, E}, raters {A, C}: d(S, Y) = 1; d(S, S') = both_empty; d(Y, Y') = 1/2.
    # GED^2 = 2 - both_empty - 1/2
    assert ged(masks(E, E), masks(A, C), both_empty=both_empty) == pytest.approx(expected)


@pytest.mark.parametrize("both_empty", [0.0, 1.0])
def test_ged_everything_empty(both_empty):
    # every pair is (E, E): GED^2 = 2b - b - b = 0 for either convention; the diversity is b itself.
    assert ged(masks(E, E, E), masks(E, E), both_empty=both_empty) == pytest.approx(0.0)
    assert sample_diversity(masks(E, E, E), both_empty=both_empty) == pytest.approx(both_empty)


@pytest.mark.parametrize("both_empty, expected", [(0.0, 0.5), (1.0, 0.25)])
def test_ged_empty_on_both_sides_mixed(both_empty, expected):
    # samples {E, E}, raters {E, A}; b = both_empty.
    # d(S, Y): (E, E) = b twice, (E, A) = 1 twice -> (2b + 2) / 4;  d(S, S') = b;  d(Y, Y'): b, 1, 1, 0 -> (b + 2) / 4
    # GED^2 = (2b + 2) / 2 - b - (b + 2) / 4 = (2 - b) / 4 -> 0.5 (b = 0), 0.25 (b = 1)
    assert ged(masks(E, E), masks(E, A), both_empty=both_empty) == pytest.approx(expected)


def test_identical_samples_have_zero_diversity():
    assert sample_diversity(masks(A, A, A)) == 0.0
    assert sample_diversity(masks(C)) == 0.0
    # identical samples and raters: GED^2 = 0
    assert ged(masks(A, A), masks(A)) == pytest.approx(0.0)


# ------------------------------------------------------------------------------------------------------ HM-IoU


def test_hm_iou_n_equals_k():
    # samples {A, C}, raters {B, A}: IoU(A, B) = 1/2, IoU(A, A) = 1, IoU(C, B) = 0, IoU(C, A) = 0.
    # matchings: A-B + C-A = 0.5 + 0 ; A-A + C-B = 1 + 0 -> best 1 / 2 = 0.5
    assert hm_iou(masks(A, C), masks(B, A)) == pytest.approx(0.5)
    # samples {A, C}, raters {C, A}: A-A + C-C = 2 -> 1
    assert hm_iou(masks(A, C), masks(C, A)) == pytest.approx(1.0)


def test_hm_iou_n_multiple_of_k():
    # samples {A, A, B, C}, raters {A, C} tiled to {A, C, A, C}:
    # best: A-A, A-A, C-C (1 each), B-C (0) -> 3 / 4.  (B-A = 1/2 would need a third A, and C must take a C.)
    assert hm_iou(masks(A, A, B, C), masks(A, C)) == pytest.approx(0.75)


def test_hm_iou_n_not_multiple_of_k():
    # N = 3 samples {A, B, C}, K = 2 raters {A, C}: lcm = 6, each sample twice, each rater three times.
    # IoU: A -> (A: 1, C: 0), B -> (A: 1/2, C: 0), C -> (A: 0, C: 1).
    # Both C copies take C (2); the third C goes to an A or B copy (0); the three A slots take the remaining
    # copies: A, A, B -> 1 + 1 + 1/2 (better than A, B, B = 2). Total 4.5 / 6 = 0.75.
    # (A rectangular 3 x 2 matching would give (1 + 1) / 2 = 1: this case tells the two apart.)
    assert hm_iou(masks(A, B, C), masks(A, C)) == pytest.approx(0.75)


def test_hm_iou_empty_masks_match_with_iou_one():
    # samples {E, A}, raters {E, A}: E-E = 1, A-A = 1 -> 1
    assert hm_iou(masks(E, A), masks(E, A)) == pytest.approx(1.0)
    # samples {E, E}, raters {E, A}: E-E = 1, E-A = 0 -> 0.5
    assert hm_iou(masks(E, E), masks(E, A)) == pytest.approx(0.5)


def test_hm_iou_untiled_is_p2sams_lenient_convention():
    # the case above: 3 samples {A, B, C}, 2 raters {A, C}. Untiled, the 3 x 2 cost matches 2 pairs: A-A, C-C -> 1,
    # although sample B matches nobody (tiled: 0.75).
    assert hm_iou(masks(A, B, C), masks(A, C), tiling=False) == pytest.approx(1.0)
    # 4 samples {A, B, B, B} for raters {A, B}: untiled only A-A and one B-B count -> 1; tiled every sample -> 1 too
    assert hm_iou(masks(A, B, B, B), masks(A, B), tiling=False) == pytest.approx(1.0)
    # a bad sample set still scores below 1 untiled: {C, C} for {A, B}
    assert hm_iou(masks(C, C), masks(A, B), tiling=False) == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------------- D_max/mean


def test_dice_max_per_rater_and_per_sample_differ():
    # samples {A, B}, raters {A, C}: Dice(A, A) = 1, Dice(A, C) = 0, Dice(B, A) = 2 / 3, Dice(B, C) = 0.
    # per rater: A -> max(1, 2/3) = 1, C -> max(0, 0) = 0 -> 0.5
    # per sample: A -> max(1, 0) = 1, B -> max(2/3, 0) = 2/3 -> 5/6
    s, r = masks(A, B), masks(A, C)
    assert dice_max(s, r) == pytest.approx(0.5)
    assert dice_max(s, r, per="rater") == pytest.approx(0.5)
    assert dice_max(s, r, per="sample") == pytest.approx(5 / 6)
    # P2SAM's eq. 12: one maximum over the 4 pairs -> Dice(A, A) = 1, although rater C is matched by no sample
    assert dice_max(s, r, per="pair") == pytest.approx(1.0)
    assert dice_max(masks(B, C), masks(A, E), per="pair") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="per"):
        dice_max(s, r, per="pixel")


def test_dice_max_and_mean_with_empty_masks():
    # samples {E, A}, raters {E}: Dice(E, E) = 1, Dice(A, E) = 0.
    # per rater: max(1, 0) = 1; per sample: (1 + 0) / 2 = 0.5; mean over the 2 x 1 pairs: 0.5
    s, r = masks(E, A), masks(E)
    assert dice_max(s, r, per="rater") == pytest.approx(1.0)
    assert dice_max(s, r, per="sample") == pytest.approx(0.5)
    assert dice_mean(s, r) == pytest.approx(0.5)
    assert dice_mean(masks(E, E), masks(E)) == pytest.approx(1.0)


def test_dice_mean_by_hand():
    # samples {A, B}, raters {A, C}: (1 + 0 + 2/3 + 0) / 4 = 5/12
    assert dice_mean(masks(A, B), masks(A, C)) == pytest.approx(5 / 12)


# ---------------------------------------------------------------------------------------------------- soft Dice


def test_soft_dice_by_hand():
    # prob = [0.95, 0.6, 0.35, 0.05]; raters {A, B} -> rater mean [1, 0.5, 0, 0].   (foreground: value > t)
    # t = 0.1: P = [1,1,1,0], R = [1,1,0,0] -> 2 * 2 / (3 + 2) = 0.8
    # t = 0.3: same -> 0.8
    # t = 0.5: P = [1,1,0,0], R = [1,0,0,0] -> 2 * 1 / (2 + 1) = 2/3
    # t = 0.7, 0.9: P = R = [1,0,0,0] -> 1, 1
    # mean = (0.8 + 0.8 + 2/3 + 1 + 1) / 5 = 64/75
    prob = np.array([0.95, 0.6, 0.35, 0.05])
    assert soft_dice(prob, masks(A, B)) == pytest.approx(64 / 75)
    # a single threshold
    assert soft_dice(prob, masks(A, B), thresholds=[0.5]) == pytest.approx(2 / 3)


def test_soft_dice_both_empty_at_a_threshold_scores_one():
    # prob = [0.2, 0, 0, 0], one empty rater: R is empty at every t.
    # t = 0.1: P = [1,0,0,0] vs empty -> 0;  t = 0.3 .. 0.9: both empty -> 1 each.  mean = 4 / 5
    assert soft_dice(np.array([0.2, 0.0, 0.0, 0.0]), masks(E)) == pytest.approx(0.8)
    # all empty: 1
    assert soft_dice(np.zeros(4), masks(E, E)) == pytest.approx(1.0)


def test_soft_dice_ties_are_background():
    # K = 10 raters, 3 of them mark pixel 0: rater mean 0.3 is not > 0.3, so at t = 0.3 R is empty, and so is P
    # for prob 0.3 -> Dice 1. At t = 0.1 both are [1, 0, 0, 0] -> 1. Everything agrees: 1.
    raters = np.zeros((10, 4), dtype=bool)
    raters[:3, 0] = True
    assert soft_dice(np.array([0.3, 0.0, 0.0, 0.0]), raters, thresholds=[0.1, 0.3]) == pytest.approx(1.0)
    # prob 0.31 is > 0.3 while the rater mean is not: at t = 0.3 Dice(P=[1,0,0,0], R=empty) = 0 -> mean 0.5
    assert soft_dice(np.array([0.31, 0.0, 0.0, 0.0]), raters, thresholds=[0.1, 0.3]) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------------- NCC


def test_ncc_by_hand():
    # samples s1 = [1,1,0], s2 = [1,0,0]; s_bar = [1, 0.5, 0]; L = -log(eps), c = -log(1 + eps) ~ 0.
    # E_ss = [c, ~L/2, c] (pixel 1: each sample costs (L + c)/2 against q = 0.5).
    # rater y1 = [1,1,0]: E_sy = [c, (c + L)/2, c] -> same [c, x, c] pattern as E_ss -> NCC 1.
    # rater y2 = [0,0,0]: E_sy = [L, (L + c)/2, c] ~ [2, 1, 0] * L/2; against [0, 1, 0]: deviations
    #   [1, 0, -1] and [-1/3, 2/3, -1/3] -> covariance -1/3 + 0 + 1/3 = 0 -> NCC 0.
    # S_NCC = (1 + 0) / 2 = 0.5
    samples = np.array([[1, 1, 0], [1, 0, 0]])
    value, nan_count = ncc(samples, np.array([[1, 1, 0], [0, 0, 0]]), return_nan_count=True)
    assert value == pytest.approx(0.5, abs=1e-6)
    assert nan_count == 0
    assert ncc(samples, np.array([[1, 1, 0]])) == pytest.approx(1.0, abs=1e-6)
    assert ncc(samples, np.array([[0, 0, 0]])) == pytest.approx(0.0, abs=1e-6)


def test_ncc_constant_maps_are_nan():
    # identical binary samples: s_bar = s_i, so E_ss = -log(1 + eps) at every pixel -> constant -> every NCC_j NaN.
    samples = np.array([[1, 1, 0, 0], [1, 1, 0, 0]])
    value, nan_count = ncc(samples, masks(A, B, C), return_nan_count=True)
    assert math.isnan(value)
    assert nan_count == 3


def test_ncc_nanmean_over_raters():
    # eps = 0, two pixels, samples (0.25, 0.25) at pixel 0 and (0.125, 0.5) at pixel 1.
    # rater y1 = [1, 1]: E_sy = [-log 0.25, -(log 0.125 + log 0.5) / 2] = [2 ln 2, (3 + 1) ln 2 / 2] = constant -> NaN.
    # rater y2 = [1, 0]: E_sy = [2 ln 2 = 1.386, -(log 0.875 + log 0.5) / 2 = 0.413]: decreasing.
    # E_ss = [H(0.25) = 0.562, at s_bar = 0.3125: mean(0.3125*3ln2 + 0.6875*(-log .875), ln 2) = 0.717]: increasing.
    # Two points anti-correlated: NCC_2 = -1. nanmean(NaN, -1) = -1, one NaN.
    probs = np.array([[0.25, 0.125], [0.25, 0.5]])
    value, nan_count = ncc(probs, np.array([[1, 1], [1, 0]]), eps=0.0, return_nan_count=True)
    assert value == pytest.approx(-1.0)
    assert nan_count == 1


# ---------------------------------------------------------------------------------------------------------- ECE


def test_ece_perfectly_calibrated_is_zero():
    # prob [0.25, 0.25, 0.75, 0.75]; raters y1 = [0,1,1,1], y2 = [0,0,0,1] -> targets [0, 0.5, 0.5, 1].
    # bin (0.2, 0.3]: mean conf 0.25, mean target 0.25; bin (0.7, 0.8]: 0.75 vs 0.75 -> ECE 0
    # (calibrated per bin although no pixel's confidence equals its target).
    raters = masks([0, 1, 1, 1], [0, 0, 0, 1])
    assert ece(np.array([0.25, 0.25, 0.75, 0.75]), raters) == pytest.approx(0.0)


def test_ece_miscalibrated_by_hand():
    # prob [0.9, 0.9, 0.1, 0.1], one rater B = [1,0,0,0] -> targets [1, 0, 0, 0].
    # bin (0.8, 0.9]: 2 pixels, conf 0.9, target 0.5 -> 2/4 * 0.4 = 0.2
    # bin [0, 0.1]:   2 pixels, conf 0.1, target 0   -> 2/4 * 0.1 = 0.05      ECE = 0.25
    assert ece(np.array([0.9, 0.9, 0.1, 0.1]), masks(B)) == pytest.approx(0.25)
    # with 2 bins, [0, 0.5] and (0.5, 1]: the same two groups -> 0.25 again; with 1 bin: |0.5 - 0.25| = 0.25
    assert ece(np.array([0.9, 0.9, 0.1, 0.1]), masks(B), n_bins=1) == pytest.approx(0.25)


def test_ece_counts_zero_confidence():
    # prob [0, 0], raters {[1, 0]} -> targets [1, 0]: both pixels in bin [0, 0.1]: |0 - 0.5| * 2/2 = 0.5.
    # (MoSE's code leaves confidence 0 out of every bin and would report 0 here.)
    assert ece(np.array([0.0, 0.0]), np.array([[1, 0]])) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------------ inputs


def test_shape_mismatch_names_the_shapes():
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5\)"):
        ged(np.zeros((2, 4)), np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        soft_dice(np.zeros((3, 3)), np.zeros((1, 3, 4)))
    with pytest.raises(ValueError, match="spatial"):
        ece(np.zeros(4), np.zeros((2, 5)))
    with pytest.raises(ValueError, match="binary"):
        hm_iou(np.full((2, 4), 0.5), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ncc(np.full((2, 4), 1.5), np.zeros((2, 4)))


# ------------------------------------------------------------------------------------------------ MONAI metrics


def _random_batch(rng, b=2, n=3, k=2, shape=(5, 6)):
    samples = torch.from_numpy(rng.random((b, n, *shape)) > 0.6)
    raters = torch.from_numpy(rng.random((b, k, *shape)) > 0.6)
    return samples, raters


PER_IMAGE = [
    (GEDMetric(), lambda s, r: ged(s, r)),
    (GEDMetric(both_empty=1.0), lambda s, r: ged(s, r, both_empty=1.0)),
    (SampleDiversityMetric(), lambda s, r: sample_diversity(s)),
    (HMIoUMetric(), hm_iou),
    (DiceMaxMetric(), dice_max),
    (DiceMaxMetric(per="sample"), lambda s, r: dice_max(s, r, per="sample")),
    (DiceMaxMetric(per="pair"), lambda s, r: dice_max(s, r, per="pair")),
    (HMIoUMetric(tiling=False), lambda s, r: hm_iou(s, r, tiling=False)),
    (DiceMeanMetric(), dice_mean),
    (SoftDiceMetric(), lambda s, r: soft_dice(s.double().mean(0), r)),
    (NCCMetric(), ncc),
    (ECEMetric(pooled=False), lambda s, r: ece(s.double().mean(0), r)),
]


@pytest.mark.parametrize("metric, fn", PER_IMAGE, ids=[f"{type(m).__name__}-{i}" for i, (m, _) in enumerate(PER_IMAGE)])
def test_metric_accumulates_two_batches_to_the_mean_of_per_image_values(metric, fn):
    rng = np.random.default_rng(1)
    batches = [_random_batch(rng), _random_batch(rng)]
    expected = [fn(s_i, r_i) for s, r in batches for s_i, r_i in zip(s, r)]
    metric.reset()
    for s, r in batches:
        metric(y_pred=s, y=r)
    assert metric.get_buffer().shape[0] == 4
    assert metric.aggregate().item() == pytest.approx(np.mean(expected), abs=1e-6)
    none = metric.aggregate(reduction="none")
    np.testing.assert_allclose(none.squeeze(1).cpu().numpy(), expected, atol=1e-6)


def test_metric_accepts_lists_of_channel_first_tensors():
    # decollated batch: [(N, *spatial)] and [(K, *spatial)]; the hand GED cases 0.5 and 1.75 -> mean 1.125
    metric = GEDMetric()
    y_pred = [torch.tensor(masks(A, B)), torch.tensor(masks(A, B))]
    metric(y_pred=y_pred, y=[torch.tensor(masks(A, C)), torch.tensor(masks(E, E))])
    assert metric.aggregate().item() == pytest.approx(1.125)


def test_ncc_metric_leaves_nan_images_out():
    # image 1: the hand case (0.5); image 2: identical samples -> NaN. mean over not-NaN = 0.5, one image counted.
    metric = NCCMetric(get_not_nans=True)
    y_pred = torch.tensor([[[1, 1, 0], [1, 0, 0]], [[1, 1, 0], [1, 1, 0]]], dtype=torch.float32)
    y = torch.tensor([[[1, 1, 0], [0, 0, 0]], [[1, 1, 0], [0, 0, 0]]])
    metric(y_pred=y_pred, y=y)
    value, not_nans = metric.aggregate()
    assert value.item() == pytest.approx(0.5, abs=1e-6)
    assert not_nans.item() == 1


def test_ece_metric_pools_pixels_over_images():
    # Probabilities given as N = 1; two batches of different image sizes.
    # image 1: prob [0.9, 0.9, 0, 0], targets [1, 0, 0, 0]
    #   bin (0.8, 0.9]: 2 px, conf sum 1.8, target sum 1;  bin [0, 0.1]: 2 px, conf sum 0, target sum 0
    #   per-image ECE = (|1.8 - 1| + 0) / 4 = 0.2
    # image 2: prob [0.1, 0.1], targets [1, 1]
    #   bin [0, 0.1]: 2 px, conf sum 0.2, target sum 2 -> per-image ECE = 1.8 / 2 = 0.9
    # per image (MONAI-style): (0.2 + 0.9) / 2 = 0.55
    # pooled (MoSE): bin (0.8, 0.9]: |1.8 - 1| = 0.8; bin [0, 0.1]: 4 px, |0.2 - 2| = 1.8 -> (0.8 + 1.8) / 6
    y_pred_1 = torch.tensor([[[0.9, 0.9, 0.0, 0.0]]])  # (B=1, N=1, 4)
    y_1 = torch.tensor([[[1, 0, 0, 0]]])
    y_pred_2 = torch.tensor([[[0.1, 0.1]]])  # (B=1, N=1, 2)
    y_2 = torch.tensor([[[1, 1]]])
    pooled, per_image = ECEMetric(), ECEMetric(pooled=False)
    for metric in (pooled, per_image):
        metric(y_pred=y_pred_1, y=y_1)
        metric(y_pred=y_pred_2, y=y_2)
    assert per_image.aggregate().item() == pytest.approx(0.55)
    assert pooled.aggregate().item() == pytest.approx(2.6 / 6)


def test_probability_metrics_use_the_mean_of_the_samples():
    # samples {A, B, B, B} -> mean [1, 0.25, 0, 0]; raters {A, B} -> targets [1, 0.5, 0, 0]
    # soft Dice: t = 0.1: P = [1,1,0,0], R = [1,1,0,0] -> 1; t = 0.3, 0.5: P = [1,0,0,0], R = [1,1,0,0] at 0.3
    # (2/3) and R = [1,0,0,0] at 0.5 (1); t = 0.7, 0.9: both [1,0,0,0] -> 1.  mean = (4 + 2/3) / 5 = 14/15
    y_pred = torch.tensor(masks(A, B, B, B))[None]
    y = torch.tensor(masks(A, B))[None]
    metric = SoftDiceMetric()
    metric(y_pred=y_pred, y=y)
    assert metric.aggregate().item() == pytest.approx(14 / 15)


def test_metric_rejects_bad_inputs():
    with pytest.raises(ValueError, match="rater"):
        GEDMetric()(y_pred=torch.zeros(1, 2, 4), y=None)
    with pytest.raises(ValueError, match="batch"):
        GEDMetric()(y_pred=torch.zeros(2, 2, 4), y=torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="per"):
        DiceMaxMetric(per="pixel")


# ------------------------------------------------------------------------------------------------ Ignite handler


def test_handler_on_an_ignite_engine():
    from ignite.engine import Engine
    from monai.handlers import from_engine

    # iteration 1: samples {A, B}, raters {A, C} -> GED 0.5; iteration 2: raters {E, E} -> GED 1.75 -> mean 1.125
    # D_max per sample: iteration 1: 5/6; iteration 2: all Dice 0 -> 0 -> mean 5/12
    data = [
        {"samples": torch.tensor(masks(A, B))[None], "label": torch.tensor(masks(A, C))[None]},
        {"samples": torch.tensor(masks(A, B))[None], "label": torch.tensor(masks(E, E))[None]},
    ]
    engine = Engine(lambda engine, batch: batch)
    GEDHandler(output_transform=from_engine(["samples", "label"])).attach(engine, "ged")
    DiceMaxHandler(per="sample", output_transform=from_engine(["samples", "label"])).attach(engine, "dmax")
    engine.run(data, max_epochs=1)
    assert engine.state.metrics["ged"] == pytest.approx(1.125)
    assert engine.state.metrics["dmax"] == pytest.approx(5 / 12)
    np.testing.assert_allclose(engine.state.metric_details["ged"].squeeze(1).numpy(), [0.5, 1.75])


def test_aggregate_is_nan_when_every_value_is_undefined():
    """NCC of a deterministic method (identical samples) is undefined on every image: NaN, not 0."""
    import math

    from ambisam.metrics import NCCMetric

    metric = NCCMetric(get_not_nans=True)
    samples = torch.zeros(2, 3, 4, 4)
    samples[:, :, 1:3, 1:3] = 1  # the same mask three times: a constant cross-entropy map
    raters = torch.zeros(2, 2, 4, 4)
    raters[:, 0, 1:3, 1:3] = 1
    metric(samples, raters)
    value, not_nans = metric.aggregate()
    assert math.isnan(float(value)) and int(not_nans) == 0


# ------------------------------------------------------------------- probability maps, undefined raters, presence


def _engine_outputs(items):
    """An engine whose output per iteration is one decollated item (a list of one dict)."""
    from ignite.engine import Engine

    engine = Engine(lambda engine, batch: batch)
    return engine, [[item] for item in items]


def _ncc_items():
    # case a: the hand case of test_ncc_nanmean_over_raters on probability maps (eps = 0): NCC -1, one undefined
    # rater; its binary samples (probs > 0.5) are all empty -> constant maps, every rater undefined.
    # case b: probabilities 0.9 and 0.1 in both samples: E_ss = H(0.9) = H(0.1) at both pixels -> constant -> NaN,
    # both raters undefined.
    probs_a = torch.tensor([[0.25, 0.125], [0.25, 0.5]], dtype=torch.float64)
    probs_b = torch.tensor([[0.9, 0.1], [0.9, 0.1]], dtype=torch.float64)
    raters = torch.tensor([[1, 1], [1, 0]])
    return [
        {"id": "a", "samples": (probs_a > 0.5).double(), "probabilities": probs_a, "label": raters},
        {"id": "b", "samples": (probs_b > 0.5).double(), "probabilities": probs_b, "label": raters},
    ]


def test_ncc_handler_reads_probability_maps_and_counts_undefined_raters(tmp_path):
    import json

    from ambisam.engines import MetricsReportWriter
    from ambisam.metrics import MetricInputs, NCCHandler

    engine, data = _engine_outputs(_ncc_items())
    NCCHandler(eps=0.0, output_transform=MetricInputs()).attach(engine, "ncc")
    MetricsReportWriter(tmp_path, num_samples=2).attach(engine)
    engine.run(data, max_epochs=1)
    assert engine.state.metrics["ncc"] == pytest.approx(-1.0)
    assert engine.state.metrics["ncc_undefined_raters"] == 3
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["overall"]["ncc"] == pytest.approx(-1.0) and report["overall"]["ncc_undefined_raters"] == 3
    assert report["per_case"]["ncc"][0] == pytest.approx(-1.0) and report["per_case"]["ncc"][1] is None
    assert report["per_case"]["ncc_undefined_raters"] == [1.0, 2.0]
    # the same cases on their binary samples: undefined everywhere (this is what NCC was computed on before 0.2.x)
    engine, data = _engine_outputs(_ncc_items())
    NCCHandler(output_transform=MetricInputs(key="samples")).attach(engine, "ncc")
    engine.run(data, max_epochs=1)
    assert math.isnan(engine.state.metrics["ncc"]) and engine.state.metrics["ncc_undefined_raters"] == 4


def test_metric_inputs_falls_back_to_samples_with_one_logged_line(caplog):
    from ambisam.metrics import MetricInputs

    item = {"samples": torch.ones(2, 3), "label": torch.zeros(1, 3)}
    inputs = MetricInputs()
    with caplog.at_level("WARNING", logger="ambisam.metrics.inputs"):
        for _ in range(3):
            y_pred, y = inputs([item])
            assert y_pred[0] is item["samples"] and y[0] is item["label"]
    assert len([r for r in caplog.records if "keep_probabilities" in r.getMessage()]) == 1
    with_probs = dict(item, probabilities=torch.full((2, 3), 0.7))
    assert inputs([with_probs])[0][0] is with_probs["probabilities"]
    with pytest.raises(KeyError):
        MetricInputs(fallback=None)([item])


def test_confidence_samples_or_probability():
    # one image, N = 1, probabilities [0.9, 0.9, 0, 0], targets [1, 0, 0, 0]
    # probability: bin (0.8, 0.9]: |1.8 - 1| = 0.8 -> ECE 0.8 / 4 = 0.2
    # samples (> 0.5) [1, 1, 0, 0]: bin (0.9, 1]: |2 - 1| = 1 -> ECE 0.25
    probs = torch.tensor([[[0.9, 0.9, 0.0, 0.0]]])
    y = torch.tensor([[[1, 0, 0, 0]]])
    prob_metric, sample_metric = ECEMetric(confidence="probability"), ECEMetric(confidence="samples")
    prob_metric(y_pred=probs, y=y)
    sample_metric(y_pred=(probs > 0.5).float(), y=y)
    assert prob_metric.aggregate().item() == pytest.approx(0.2)
    assert sample_metric.aggregate().item() == pytest.approx(0.25)
    assert prob_metric.confidence == "probability" and SoftDiceMetric().confidence == "samples"
    # soft Dice, thresholds 0.1 and 0.5: probability 0.4 at the rater pixel -> t=0.1: 1, t=0.5: P empty vs R
    # [1, 0] -> 0 -> 0.5; its sample (0.4 <= 0.5) is empty -> 0 at both thresholds.
    y = torch.tensor([[[1, 0]]])
    soft = SoftDiceMetric(thresholds=(0.1, 0.5), confidence="probability")
    soft(y_pred=torch.tensor([[[0.4, 0.0]]]), y=y)
    assert soft.aggregate().item() == pytest.approx(0.5)
    for cls in (ECEMetric, SoftDiceMetric):
        with pytest.raises(ValueError, match="confidence"):
            cls(confidence="fraction")


def test_empty_fractions_by_hand():
    # samples: 1 of 4 empty; raters: 2 of 4 empty (the whole case, every pixel, decides)
    samples = masks(A, B, E, C)
    raters = masks(E, A, E, B)
    assert empty_fractions(samples, raters) == (0.25, 0.5)
    assert empty_fractions(masks(A), masks(E)) == (0.0, 1.0)


def test_presence_handler_gap_and_fractions(tmp_path):
    import json

    from monai.handlers import from_engine

    from ambisam.engines import MetricsReportWriter
    from ambisam.metrics import PresenceHandler

    # case a: |0.25 - 0.5| = 0.25; case b: nothing empty on either side -> 0. gap = 0.125
    items = [
        {"id": "a", "samples": torch.tensor(masks(A, B, E, C)), "label": torch.tensor(masks(E, A, E, B))},
        {"id": "b", "samples": torch.tensor(masks(A, A, B, B)), "label": torch.tensor(masks(A, B, C, C))},
    ]
    engine, data = _engine_outputs(items)
    PresenceHandler(output_transform=from_engine(["samples", "label"])).attach(engine, "presence_gap")
    MetricsReportWriter(tmp_path, num_samples=4).attach(engine)
    engine.run(data, max_epochs=1)
    assert engine.state.metrics["presence_gap"] == pytest.approx(0.125)
    assert engine.state.metrics["samples_empty"] == pytest.approx(0.125)
    assert engine.state.metrics["raters_empty"] == pytest.approx(0.25)
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["per_case"]["presence_gap"] == [0.25, 0.0]
    assert report["per_case"]["samples_empty"] == [0.25, 0.0]
    assert report["per_case"]["raters_empty"] == [0.5, 0.0]
    assert report["overall"]["presence_gap"] == pytest.approx(0.125)


# ------------------------------------------------------------------------------------------ personalised Dice


def test_personalised_dice_fixed_and_hungarian_by_hand():
    from ambisam.metrics import personalised_dice

    # predictions (C, B) for raters (A, C): the fixed pairs C~A and B~C share nothing -> 0; the best assignment
    # C~C (Dice 1) and B~A (2 * 1 / (1 + 2) = 2/3) -> 5/6
    preds, raters = masks(C, B), masks(A, C)
    assert personalised_dice(preds, raters) == pytest.approx(0.0)
    assert personalised_dice(preds, raters, matching="hungarian") == pytest.approx(5 / 6)
    # shuffled: each prediction against the other rater: C~C (1) and B~A (2/3) -> 5/6 here, (C~A 0, B~C 0) in order
    assert personalised_dice(preds, raters, matching="shuffled") == pytest.approx(5 / 6)
    assert personalised_dice(masks(B, C), raters, matching="shuffled") == pytest.approx(0.0)
    # in rater order the two agree: (B, C) -> (2/3 + 1) / 2
    for matching in ("fixed", "hungarian"):
        assert personalised_dice(masks(B, C), raters, matching=matching) == pytest.approx(5 / 6)
    # torch input, a 2D spatial shape
    swapped = torch.tensor(masks(C, A)).reshape(2, 2, 2)
    assert personalised_dice(swapped, torch.tensor(masks(A, C)).reshape(2, 2, 2), "hungarian") == pytest.approx(1)


def test_personalised_dice_empty_masks_score_one():
    from ambisam.metrics import personalised_dice

    # (E, A) for (E, B): E~E 1, A~B 2/3 -> 5/6 both ways; everything empty -> 1
    assert personalised_dice(masks(E, A), masks(E, B)) == pytest.approx(5 / 6)
    assert personalised_dice(masks(E, A), masks(E, B), matching="hungarian") == pytest.approx(5 / 6)
    assert personalised_dice(masks(E, E), masks(E, E), matching="hungarian") == 1.0
    assert personalised_dice(masks(A, E), masks(E, A)) == 0.0  # an empty prediction against a mask: 0


def test_personalised_dice_rater_valid_and_row_count():
    from ambisam.metrics import personalised_dice

    preds, raters = masks(C, B, A), masks(A, C, E)
    # every rater counts: fixed C~A 0, B~C 0, A~E 0 -> 0; hungarian C~C 1, A~A 1, B~E 0 -> 2/3
    assert personalised_dice(preds, raters) == 0.0
    assert personalised_dice(preds, raters, "hungarian") == pytest.approx(2 / 3)
    # rater 2 did not read: it and prediction 2 are left out -> the 2-rater case of above
    valid = [1, 1, 0]
    assert personalised_dice(preds, raters, rater_valid=valid) == 0.0
    assert personalised_dice(preds, raters, "hungarian", rater_valid=torch.tensor(valid)) == pytest.approx(5 / 6)
    # the label as SelectReadRatersd leaves it (only the raters who read) gives the same
    assert personalised_dice(preds, masks(A, C), "hungarian", rater_valid=valid) == pytest.approx(5 / 6)
    # N = 2K: the first K rows count
    assert personalised_dice(masks(B, C, E, E), masks(A, C)) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="K = 2 rows"):
        personalised_dice(masks(B, C, A), masks(A, C))
    with pytest.raises(ValueError, match="K = 3 rows"):
        personalised_dice(masks(B, C), masks(A, C, E))
    with pytest.raises(ValueError, match="raters has 1 masks for 3 rater flags"):
        personalised_dice(preds, masks(A), rater_valid=valid)
    with pytest.raises(ValueError, match="no rater read"):
        personalised_dice(preds, raters, rater_valid=[0, 0, 0])
    with pytest.raises(ValueError, match="'fixed', 'hungarian'"):
        personalised_dice(preds, raters, matching="greedy")


def test_personalised_dice_metric_and_handler():
    from monai.handlers import from_engine

    from ambisam.metrics import PersonalisedDiceHandler, PersonalisedDiceMetric

    # case a: (C, B) for (A, C) as above: fixed 0, hungarian 5/6; case b: (B, C, A) for (A, C, E), rater 2 unread,
    # label already reduced to (A, C) by SelectReadRatersd: fixed (2/3 + 1) / 2 = 5/6, hungarian 5/6
    items = [
        {"samples": torch.tensor(masks(C, B)), "label": torch.tensor(masks(A, C)), "rater_valid": torch.ones(2)},
        {"samples": torch.tensor(masks(B, C, A)), "label": torch.tensor(masks(A, C)),
         "rater_valid": torch.tensor([1.0, 1.0, 0.0])},
    ]
    engine, data = _engine_outputs(items)
    inputs = from_engine(["samples", "label", "rater_valid"])
    PersonalisedDiceHandler(output_transform=inputs).attach(engine, "pdice")
    PersonalisedDiceHandler(matching="hungarian", output_transform=inputs).attach(engine, "pdice_matched")
    engine.run(data, max_epochs=1)
    assert engine.state.metrics["pdice"] == pytest.approx(5 / 12)
    assert engine.state.metrics["pdice_matched"] == pytest.approx(5 / 6)
    np.testing.assert_allclose(engine.state.metric_details["pdice"].squeeze(1).numpy(), [0.0, 5 / 6])
    # without rater_valid (every rater read): (y_pred, y) as for the other handlers
    engine, data = _engine_outputs(items[:1])
    PersonalisedDiceHandler("hungarian", output_transform=from_engine(["samples", "label"])).attach(engine, "p")
    engine.run(data, max_epochs=1)
    assert engine.state.metrics["p"] == pytest.approx(5 / 6)
    # the metric on batch-first tensors with (B, K) flags
    metric = PersonalisedDiceMetric()
    metric(torch.tensor(masks(B, C, A))[None], torch.tensor(masks(A, C, E))[None], rater_valid=torch.tensor([[1, 1, 0]]))
    metric(torch.tensor(masks(C, B))[None], torch.tensor(masks(A, C))[None])
    assert float(metric.aggregate()) == pytest.approx(5 / 12)
    with pytest.raises(ValueError, match="'fixed', 'hungarian'"):
        PersonalisedDiceHandler(matching="best")
    with pytest.raises(ValueError, match="got 1 entries"):
        PersonalisedDiceHandler().update([torch.zeros(1, 2, 4)])
