"""UR-SAM's ensemble, class-specific threshold, rectification and comparison strategies on hand-built arrays
whose answers are worked out by hand (ambisam.networks.ursam)."""

import math

import pytest
import torch

from ambisam.networks.ursam import (
    STRATEGIES,
    box_masks,
    class_specific_threshold,
    correct,
    ensemble_uncertainty,
    rectify,
    uncertainty_mask,
)


def test_ensemble_is_the_mean_probability_and_its_entropy_in_bits():
    probs = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]]])  # (B=1, n=2, 1, 2)
    mean, u = ensemble_uncertainty(probs)
    assert mean.tolist() == [[[0.5, 0.0]]]
    assert u.tolist() == [[[1.0, 0.0]]]  # p = 0.5: one bit; p = 0: none


def test_box_masks_include_both_corners():
    box = box_masks(torch.tensor([[1, 0, 2, 1]]), (3, 4))
    assert box[0].int().tolist() == [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]


def test_class_specific_threshold_is_equation_4():
    u = torch.zeros(1, 4, 4)
    u[0, 0, 0], u[0, 3, 3] = 0.2, 1.0  # min 0, max 1
    box = torch.zeros(1, 4, 4, dtype=torch.bool)
    box[0, :2, :4] = True  # S_b = 8
    mask = torch.zeros_like(box)
    mask[0, 0, :2] = True  # S_yhat = 2
    # T = 0 + (2 + 8) / (2 * 8) * (1 - 0) = 0.625
    assert class_specific_threshold(u, mask, box).item() == pytest.approx(0.625)
    assert uncertainty_mask(u, mask, box).sum().item() == 1  # only the 1.0 pixel exceeds 0.625
    assert uncertainty_mask(u, mask, box, threshold=0.1).sum().item() == 2  # a fixed threshold takes both


def test_a_target_filling_its_box_leaves_nothing_uncertain():
    u = torch.rand(1, 5, 5)
    box = torch.ones(1, 5, 5, dtype=torch.bool)
    # S_yhat = S_b: T = max u, and no pixel is above its maximum
    assert not uncertainty_mask(u, box.clone(), box).any()


def _scene():
    """A 1 x 6 row: certain target at intensity 10 (pixels 0-1), certain background at 2 (pixel 5), and three
    uncertain pixels at 9, 3 and 20."""
    image = torch.tensor([[[10.0, 10.0, 9.0, 3.0, 20.0, 2.0]]])
    mask = torch.tensor([[[True, True, True, False, False, False]]])
    unsure = torch.tensor([[[False, False, True, True, True, False]]])
    box = torch.ones_like(mask)
    return image, mask, unsure, box


def test_rectification_keeps_the_certain_target_and_adds_uncertain_pixels_of_target_intensity():
    image, mask, unsure, box = _scene()
    # I_t = 10, I_b = 2: a pixel of M_unc joins when (10 - 2) / 2 = 4 < x < 1.5 * 10 = 15
    out = rectify(mask, unsure, image, box, alpha_h=1.5)
    assert out[0, 0].tolist() == [True, True, True, False, False, False]
    # a larger alpha_h lets the bright pixel (20) in too
    assert rectify(mask, unsure, image, box, alpha_h=2.5)[0, 0].tolist() == [True, True, True, False, True, False]


def test_background_outside_the_box_does_not_count_and_no_certain_target_keeps_the_mask():
    image, mask, unsure, box = _scene()
    box[0, 0, 5] = False  # no certain background inside the box: I_b = 0, lower bound 5 -> the 3 stays out
    assert rectify(mask, unsure, image, box, 1.5)[0, 0].tolist() == [True, True, True, False, False, False]
    none = torch.zeros_like(mask)
    unsure_all = torch.ones_like(mask)  # every target pixel uncertain: I_t undefined, the mask is kept
    assert torch.equal(rectify(mask, unsure_all, image, box, 1.5), mask)
    assert not rectify(none, unsure_all, image, box, 1.5).any()


def test_strategies_remove_add_or_flip_the_uncertain_pixels():
    # n = 2 augmented boxes on a 1 x 4 row: both say target on pixel 0, they disagree on 1 and 2, neither on 3
    probs = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]], [[1.0, 0.0, 1.0, 0.0]]]]).clamp(0.01, 0.99)
    boxes = torch.tensor([[0, 0, 3, 0]])
    image = torch.tensor([[[5.0, 5.0, 0.0, 0.0]]])
    res = {s: correct(s, probs, image, boxes, alpha_h=1.5) for s in STRATEGIES}
    # y_hat = [0.99, 0.5, 0.5, 0.01] -> mask [1, 0, 0, 0]; u max on pixels 1 and 2; S_yhat 1, S_b 4: T = min + 5/8 range
    assert res["ensemble"]["uncertain"][0, 0].tolist() == [False, True, True, False]
    assert res["ensemble"]["mask"][0, 0].tolist() == [True, False, False, False]
    assert res["unc_fpc"]["mask"][0, 0].tolist() == [True, False, False, False]  # nothing uncertain inside to remove
    assert res["unc_fnc"]["mask"][0, 0].tolist() == [True, True, True, False]
    assert res["unc_fpnc"]["mask"][0, 0].tolist() == [True, True, True, False]
    # rectified: I_t = 5, I_b = 0 (pixel 3): the uncertain pixel of intensity 5 joins (2.5 < 5 < 7.5), the 0 not
    assert res["ursam"]["mask"][0, 0].tolist() == [True, True, False, False]
    assert res["ursam"]["probability"][0, 0, 1].item() == pytest.approx(0.5)
    assert res["ursam"]["uncertainty"][0, 0, 1].item() == pytest.approx(1.0)
    assert res["ursam"]["uncertainty"][0, 0, 0].item() == pytest.approx(
        -(0.99 * math.log2(0.99) + 0.01 * math.log2(0.01)), rel=1e-4)


def test_units_are_independent_in_a_batch():
    image, mask, unsure, box = _scene()
    two = rectify(torch.cat([mask, mask]), torch.cat([unsure, unsure]), torch.cat([image, image * 0 + 1]),
                  torch.cat([box, box]), 1.5)
    assert torch.equal(two[:1], rectify(mask, unsure, image, box, 1.5))


def test_bad_strategy_and_missing_image_are_clear_errors():
    probs = torch.rand(1, 3, 4, 4)
    boxes = torch.tensor([[0, 0, 3, 3]])
    with pytest.raises(ValueError, match="unknown strategy"):
        correct("median", probs, None, boxes)
    with pytest.raises(ValueError, match="needs the image"):
        correct("ursam", probs, None, boxes)


def test_augmented_boxes_move_by_at_most_ratio_times_the_input_side():
    from ambisam.networks import UrSam

    class Backbone(torch.nn.Module):  # what augmentation reads of a backbone: its input side
        image_size = 1024

    net = UrSam.__new__(UrSam)
    torch.nn.Module.__init__(net)
    net.backbone, net.ratio = Backbone(), 0.01
    boxes = torch.tensor([[100.0, 200.0, 300.0, 400.0]])
    torch.manual_seed(0)
    moved = net.jitter_boxes(boxes, 64)
    shift = (moved - boxes[:, None]).abs()
    assert shift.max().item() <= 10.24 + 1e-4 and shift.max().item() > 5  # up to 1% of 1024 px, and it moves
    assert (moved[..., :2] <= moved[..., 2:]).all()


def test_augmented_boxes_come_from_each_images_seed_when_the_conditions_carry_seeds():
    """A case's boxes are reproducible from its own seed in any order or rank; images sharing a seed (the slices of
    one volume and structure) get the same shifts."""
    from ambisam.networks import UrSam
    from ambisam.networks.base import Conditions

    class Backbone(torch.nn.Module):
        image_size = 1024

    net = UrSam.__new__(UrSam)
    torch.nn.Module.__init__(net)
    net.backbone, net.ratio = Backbone(), 0.01
    boxes = torch.tensor([[100.0, 200.0, 300.0, 400.0]] * 3)
    seeded = Conditions(noise_seeds=torch.tensor([5, 5, 6]))
    moved = net.jitter_boxes(boxes, 8, seeded)
    torch.rand(100)  # the global generator moves on: no effect
    assert torch.equal(net.jitter_boxes(boxes, 8, seeded), moved)
    assert torch.equal(moved[0], moved[1]) and not torch.equal(moved[0], moved[2])
    assert (moved - boxes[:, None]).abs().max().item() <= 10.24 + 1e-4
