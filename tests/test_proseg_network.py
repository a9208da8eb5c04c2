"""ProSeg on the real LiteMedSAM backbone (and its U-Net option on a tiny grid): the modes and their rater
selection, the seeded draws, the flat Dirichlet from normal draws, the KL terms, the loss and what it trains, the
two learning rates, the rater-id checks and the anonymous-rater mode.

The SAM mask decoder costs about a second per call on two busy CPU threads, so most tests decode the example's
box once (``features``, module-scoped) and stand those features in for :meth:`ProSeg.pixel_features`, mostly a
64 x 64 crop of them across the ellipse's edge (``crop``: the 1x1 heads cost per pixel); the tests of the decoder
path itself (one decoder call per image, gradients into the decoder, the hook's cleanup) run it. Tests that
train the decoder work on a deep copy of the shared backbone."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from monai.losses import DiceLoss

from ambisam.losses import ProSegLoss
from ambisam.networks import Conditions, MaskSamplingNetwork, ProSeg, method_registry
from ambisam.networks.proseg import flat_dirichlet_from_normal, gaussian_kl_to_prior

K = 4


@pytest.fixture
def proseg(litemedsam):
    """ProSeg with PyTorch's random initialisation (not SAM's, see the next test), so that its raters and latents
    already move the masks, as after training."""
    torch.manual_seed(0)
    model = ProSeg(backbone=litemedsam, sam_init=False).eval()
    yield model
    litemedsam.eval()


def test_an_untrained_model_is_box_prompted_sam_in_every_mode(litemedsam, example, crop, monkeypatch):
    torch.manual_seed(0)
    model = _with_features(ProSeg(backbone=litemedsam).eval(), crop["features"], monkeypatch)
    sam_logit = crop["features"][:, -1:]  # (1, 1, h, w)
    emb = _embeddings(example)
    with torch.no_grad():
        personalised = model.sample_logits(emb, _conditions(example, mode="personalised"), K)
        diverse = model.sample_logits(emb, _conditions(example), 8)
    # decoded through z_x's first channel: exact up to the near-zero weights; diverse adds its noise (0.3 logits SD)
    assert torch.allclose(personalised, sam_logit.expand_as(personalised), rtol=0.01, atol=0.05)
    assert (diverse - sam_logit).abs().max() < 2.0 and (diverse - sam_logit).std() > 0.01  # sigma 0.03 x 10
    assert ((personalised > 0) == (sam_logit > 0)).float().mean() > 0.999  # the same mask but at its edge
    # a rater's head moves its rater's mask at once: a bias on its mean of that channel is a boundary shift
    with torch.no_grad():
        model.statistic_heads[1].bias[0] = 5.0
        moved = model.sample_logits(emb, _conditions(example, mode="personalised"), K)
    assert (moved[:, 1] > 0).sum() > (moved[:, 0] > 0).sum() and torch.equal(moved[:, 0], personalised[:, 0])
    unet = ProSeg("unet", image_size=32, unet_features=(4, 4, 4, 4, 4, 4), sam_init=True)
    assert not unet.sam_init  # the paper's setting: PyTorch's initialisation


@pytest.fixture(scope="module")
def features(litemedsam, example):
    """The 33 feature channels of the example's box, decoded once: ``(1, 33, 256, 256)``."""
    torch.manual_seed(0)
    with torch.no_grad():
        return ProSeg(backbone=litemedsam).pixel_features(example["embeddings"], example["boxes"])


#: rows and columns of the crop: the top-left part of the ellipse's edge (both classes in the rater mask)
CROP = (slice(72, 136), slice(64, 128))


@pytest.fixture(scope="module")
def crop(features, example):
    """A 64 x 64 crop of the features, the rater mask and the image (at backbone input size) on it."""
    mask = example["rater_mask"][..., CROP[0], CROP[1]]
    assert 0 < mask.mean() < 1
    image = torch.nn.functional.interpolate(example["image"], size=(256, 256), mode="bilinear")
    return {"features": features[..., CROP[0], CROP[1]].contiguous(), "rater_mask": mask,
            "image": image[..., CROP[0], CROP[1]]}


def _with_features(model, features, monkeypatch):
    """Let ``model`` read the precomputed ``features`` (repeated over the batch) instead of decoding."""
    monkeypatch.setattr(model, "pixel_features", lambda embeddings, boxes: features.expand(len(embeddings), -1, -1, -1))
    return model


def _conditions(example, batch=1, **kwargs):
    return Conditions(boxes=example["boxes"].expand(batch, -1), **kwargs)


def _embeddings(example, batch=1):
    return example["embeddings"].expand(batch, -1, -1, -1)


def test_registered_with_its_capabilities():
    assert method_registry["proseg"].network_class is ProSeg and issubclass(ProSeg, MaskSamplingNetwork)
    caps = ProSeg.capabilities
    assert caps.training_target == "rater" and caps.needs_prompt and caps.encoder == "frozen"
    assert caps.conditions == ("image", "rater_id", "mode")


def test_rater_latents_start_at_their_two_dimensions(proseg):
    alphas = proseg.rater_alphas.detach()
    assert alphas.shape == (K, 8)
    for r in range(K):
        high = torch.nonzero(alphas[r] == 1.0).flatten().tolist()
        assert high == [r, r + 4] and torch.allclose(alphas[r][alphas[r] != 1.0], torch.tensor(0.1))
    assert len(proseg.statistic_heads) == len(proseg.reconstruction_heads) == K
    assert proseg.rater_classifier.out_features == K and proseg.feature_channels == 33


def test_the_decoder_runs_once_per_image_and_its_hook_is_removed(proseg, example, features, monkeypatch):
    decoder = proseg.backbone.mask_decoder
    calls = []
    original = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    with torch.no_grad():
        samples = proseg.sample_logits(_embeddings(example, 2), _conditions(example, 2), 6)
        assert calls == [1, 1]  # two images, 6 samples each: one decoder call per image
        sam_logits, _ = proseg.backbone.decode_boxes(example["embeddings"], example["boxes"])
    assert samples.shape == (2, 6, 256, 256) and torch.isfinite(samples).all()
    assert len(decoder.output_upscaling._forward_hooks) == 0
    assert features.shape == (1, 33, 256, 256) and torch.allclose(features[:, 32:], sam_logits, atol=1e-5)


def test_draw_samples_shapes(proseg, example, features, crop, monkeypatch):
    _with_features(proseg, features, monkeypatch)
    with torch.no_grad():
        out = proseg.sample_logits(_embeddings(example, 2), _conditions(example, 2, mode="personalised"), 3)
        assert out.shape == (2, 3, 256, 256) and torch.isfinite(out).all()
        _with_features(proseg, crop["features"], monkeypatch)
        for training in (False, True):
            proseg.train(training)
            for mode in (None, "diverse", "personalised"):
                for n in (1, 5):
                    out = proseg.sample_logits(_embeddings(example, 2), _conditions(example, 2, mode=mode), n)
                    assert out.shape == (2, n, 64, 64) and torch.isfinite(out).all()
    proseg.eval()


def test_personalised_is_deterministic_and_sample_i_is_rater_i_mod_k(proseg, example, crop, monkeypatch):
    _with_features(proseg, crop["features"], monkeypatch)
    emb = _embeddings(example)
    with torch.no_grad():
        first = proseg.sample_logits(emb, _conditions(example, mode="personalised"), 6)[0]
        again = proseg.sample_logits(emb, _conditions(example, mode="personalised"), 6)[0]
        chosen = proseg.sample_logits(emb, _conditions(example, mode="personalised", rater_ids=torch.tensor([2])), 3)
    assert torch.equal(first, again)
    assert torch.equal(first[4], first[0]) and torch.equal(first[5], first[1])
    assert all((first[i] - first[j]).abs().max() > 1e-4 for i in range(K) for j in range(i))
    assert all(torch.equal(chosen[0, i], first[2]) for i in range(3))


def test_eval_single_sample_is_the_mean_probability_of_the_raters(proseg, example, crop, monkeypatch):
    _with_features(proseg, crop["features"], monkeypatch)
    emb = _embeddings(example)
    with torch.no_grad():
        one = proseg.sample_logits(emb, _conditions(example), 1)
        personalised = proseg.sample_logits(emb, _conditions(example, mode="personalised"), K)
        rater_3 = proseg.sample_logits(emb, _conditions(example, rater_ids=torch.tensor([3])), 1)
    assert torch.equal(one, proseg.sample_logits(emb, _conditions(example), 1))
    assert torch.allclose(one.sigmoid(), personalised.sigmoid().mean(dim=1, keepdim=True), atol=1e-5)
    assert torch.allclose(rater_3.sigmoid(), personalised[:, 3:].sigmoid(), atol=1e-5)  # its logit is clamped at 1e-6


def test_diverse_draws_follow_the_seeds(proseg, example, crop, monkeypatch):
    _with_features(proseg, crop["features"], monkeypatch)
    emb = _embeddings(example, 2)
    with torch.no_grad():
        seeded = proseg.sample_logits(emb, _conditions(example, 2, noise_seeds=torch.tensor([7, 7])), 4)
        same = proseg.sample_logits(emb, _conditions(example, 2, noise_seeds=torch.tensor([7, 8])), 4)
        torch.manual_seed(1)
        free = proseg.sample_logits(emb, _conditions(example, 2, mode="diverse"), 4)
        torch.manual_seed(2)
        other = proseg.sample_logits(emb, _conditions(example, 2, mode="diverse"), 4)
    assert torch.equal(seeded[0], seeded[1]) and torch.equal(seeded[0], same[0])  # one seed, one draw
    assert (seeded[0] - same[1]).abs().max() > 1e-3
    assert (free - other).abs().max() > 1e-3
    assert all((seeded[0, i] - seeded[0, j]).abs().max() > 1e-4 for i in range(4) for j in range(i))


def test_diverse_samples_go_round_robin_over_the_rater_heads(proseg, example, crop, monkeypatch):
    """With every head's ``z_x`` made certain (``log sigma^2 = -40``) and ``z_r`` cut off from the mask head, a
    diverse sample is its head's rater's personalised prediction: sample ``i`` must come from head ``i mod K``
    (or, with ``rater_ids``, every sample from that rater's)."""
    _with_features(proseg, crop["features"], monkeypatch)
    with torch.no_grad():
        for head in proseg.statistic_heads:
            head.weight[16:] = 0.0
            head.bias[16:] = -40.0
        proseg.mask_head[0].weight[:, :8] = 0.0
        emb = _embeddings(example)
        personalised = proseg.sample_logits(emb, _conditions(example, mode="personalised"), K)[0]
        diverse = proseg.sample_logits(emb, _conditions(example, mode="diverse"), 6)[0]
        rater_1 = proseg.sample_logits(emb, _conditions(example, mode="diverse", rater_ids=torch.tensor([1])), 3)[0]
    for i in range(6):
        assert torch.allclose(diverse[i], personalised[i % K], atol=1e-4), i
    assert all(torch.allclose(rater_1[i], personalised[1], atol=1e-4) for i in range(3))


def test_flat_dirichlet_from_normal_draws():
    torch.manual_seed(0)
    draws = flat_dirichlet_from_normal(torch.randn(200_000, 8))
    assert (draws >= 0).all() and torch.allclose(draws.sum(-1), torch.ones(200_000))
    assert torch.allclose(draws.mean(0), torch.full((8,), 1 / 8), atol=2e-3)
    # Dir(1) in 8 dimensions: each coordinate is Beta(1, 7), variance 7 / (64 * 9)
    assert torch.allclose(draws.var(0), torch.full((8,), 7 / 576), rtol=0.05)
    extreme = flat_dirichlet_from_normal(torch.tensor([[-40.0, 40.0, 0.0, 0.0]]))
    assert torch.isfinite(extreme).all() and extreme[0, 0] > extreme[0, 2] > extreme[0, 1] > 0


def test_gaussian_kl_to_prior_by_hand():
    zeros = torch.zeros(2, 16, 4, 4)
    assert torch.equal(gaussian_kl_to_prior(zeros, zeros + 1.0, 1.0), torch.zeros(2))
    # mu = 1, sigma^2 = 1 against N(0, 1): 1/2 per channel and pixel, 16 channels
    assert torch.allclose(gaussian_kl_to_prior(zeros + 1.0, zeros, 0.0), torch.full((2,), 8.0))
    # mu = 0, sigma^2 = 1 against N(0, e) (the reference code's prior): (1 - 0 + 1/e - 1) / 2 per value
    expected = 16 * 0.5 * (1.0 - 0.0 + math.exp(-1.0) - 1.0)
    assert torch.allclose(gaussian_kl_to_prior(zeros, zeros, 1.0), torch.full((2,), expected))


def test_image_kl_is_zero_when_the_heads_give_the_prior(litemedsam, example, crop, monkeypatch):
    model = ProSeg(backbone=litemedsam, prior_log_variance=1.0)
    _with_features(model, crop["features"], monkeypatch).train()
    with torch.no_grad():
        for head in model.statistic_heads:
            head.weight.zero_()
            head.bias[:16] = 0.0
            head.bias[16:] = 1.0
        conditions = _conditions(example, images=crop["image"], rater_ids=torch.tensor([0]))
        out = model.training_outputs(example["embeddings"], conditions, crop["rater_mask"])
    model.eval()
    assert torch.equal(out["kl_image"], torch.zeros(1))
    assert out["kl_rater"].shape == (1,) and out["kl_rater"] > 0  # Dir(softplus(alpha)) is not Dir(1)


def test_training_outputs_loss_and_what_it_trains(litemedsam, example):
    backbone = copy.deepcopy(litemedsam)
    torch.manual_seed(0)
    model = ProSeg(backbone=backbone).train()
    rater_masks = example["rater_mask"].expand(2, -1, -1, -1)
    conditions = _conditions(example, 2, images=torch.rand(2, 1, 256, 256), rater_ids=torch.tensor([1, 3]))
    out = model.training_outputs(_embeddings(example, 2), conditions, rater_masks)
    shapes = {key: tuple(value.shape) for key, value in out.items()}
    assert shapes == {"logits": (2, 1, 256, 256), "rater_logits": (2, K), "rater_ids": (2,),
                      "reconstruction": (2, 1, 256, 256), "reconstruction_target": (2, 1, 256, 256),
                      "kl_rater": (2,), "kl_image": (2,)}
    assert out["rater_ids"].tolist() == [1, 3] and not out["reconstruction_target"].requires_grad
    loss_function = ProSegLoss()
    loss = loss_function(out, rater_masks)
    assert loss.ndim == 0 and torch.isfinite(loss)
    parts = loss_function.components()
    assert set(parts) == {"dice", "rater_ce", "reconstruction", "kl_rater", "kl_image", "kl_weighted", "total"}
    assert math.isclose(parts["total"], parts["dice"] + parts["rater_ce"] + parts["reconstruction"]
                        + 0.1 * (parts["kl_rater"] + parts["kl_image"]), rel_tol=1e-5)
    loss.backward()
    grad = model.rater_alphas.grad
    assert grad is not None and grad[[1, 3]].abs().sum() > 0 and torch.equal(grad[[0, 2]], torch.zeros(2, 8))
    for part in (model.statistic_heads[1], model.statistic_heads[3], model.mask_head, model.rater_classifier,
                 model.reconstruction_heads[1], backbone.mask_decoder, backbone.prompt_encoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part
    assert all(p.grad is None or not p.grad.any() for p in model.statistic_heads[0].parameters())
    assert not any(p.requires_grad or p.grad is not None for p in backbone.image_encoder.parameters())


def test_loss_terms_by_hand():
    torch.manual_seed(0)
    target = torch.zeros(2, 1, 16, 16)
    target[0, :, 4:12, 4:12] = 1.0  # image 1's rater drew nothing
    outputs = {
        "logits": torch.randn(2, 1, 8, 8),  # upsampled to the target's 16 x 16
        "rater_logits": torch.zeros(2, K),
        "rater_ids": torch.tensor([0, 3]),
        "reconstruction": torch.zeros(2, 1, 8, 8),
        "reconstruction_target": torch.ones(2, 1, 8, 8),
        "kl_rater": torch.tensor([1.0, 3.0]),
        "kl_image": torch.tensor([0.0, 2.0]),
    }
    loss_function = ProSegLoss()
    total = loss_function(outputs, target)
    parts = loss_function.components()
    assert parts["rater_ce"] == pytest.approx(math.log(K))  # one softmax over K equal logits
    assert parts["reconstruction"] == pytest.approx(1.0)
    assert parts["kl_rater"] == pytest.approx(2.0) and parts["kl_image"] == pytest.approx(1.0)
    assert parts["kl_weighted"] == pytest.approx(0.3)
    # one channel: the generalised Dice of image 0 is its soft Dice, the empty image 1 adds 0 (a mean over two)
    logits = torch.nn.functional.interpolate(outputs["logits"], size=(16, 16), mode="bilinear")
    soft_dice = DiceLoss(sigmoid=True, reduction="none")(logits, target).flatten()
    assert parts["dice"] == pytest.approx(float(soft_dice[0]) / 2, rel=2e-3)  # up to the smoothing terms
    assert float(total) == pytest.approx(parts["dice"] + math.log(K) + 1.0 + 0.3, rel=1e-5)
    pooled = ProSegLoss(dice_batch=True)
    pooled(outputs, target)
    assert pooled.components()["dice"] > parts["dice"]  # the empty image's false positives count
    with pytest.raises(ValueError, match="outputs lack"):
        loss_function({"logits": outputs["logits"]}, target)


def test_parameter_groups_give_the_rater_parts_their_own_rate(proseg):
    network, raters = proseg.parameter_groups(1e-4, 1e-2)
    assert network["lr"] == 1e-4 and raters["lr"] == 1e-2
    rater_parts = {id(proseg.rater_alphas), *map(id, proseg.rater_classifier.parameters())}
    assert {id(p) for p in raters["params"]} == rater_parts
    trainable = {id(p) for p in proseg.parameters() if p.requires_grad}
    assert {id(p) for p in network["params"]} | {id(p) for p in raters["params"]} == trainable
    assert not {id(p) for p in network["params"]} & {id(p) for p in raters["params"]}
    assert id(next(proseg.statistic_heads.parameters())) in {id(p) for p in network["params"]}
    assert torch.optim.Adam(proseg.parameter_groups(1e-4, 1e-2)).param_groups[1]["lr"] == 1e-2
    # the pretrained decoder at its own rate: three disjoint groups covering every trainable parameter
    heads, raters, backbone = proseg.parameter_groups(1e-3, 1e-2, backbone_learning_rate=1e-4)
    assert backbone["lr"] == 1e-4 and {id(p) for p in raters["params"]} == rater_parts
    decoder = {id(p) for p in proseg.backbone.mask_decoder.parameters()}
    assert decoder <= {id(p) for p in backbone["params"]} and not decoder & {id(p) for p in heads["params"]}
    ids = [id(p) for g in (heads, raters, backbone) for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == trainable


def test_a_few_steps_reduce_the_loss(litemedsam, example, crop, monkeypatch):
    """The heads and rater latents (the decoder's features held fixed) fit the one example's crop."""
    torch.manual_seed(0)
    model = _with_features(ProSeg(backbone=litemedsam), crop["features"], monkeypatch).train()
    conditions = _conditions(example, images=crop["image"], rater_ids=torch.tensor([2]))
    loss_function = ProSegLoss()
    optimizer = torch.optim.Adam(model.parameter_groups(1e-2, 1e-2))

    def loss_at_seed():
        torch.manual_seed(5)
        return loss_function(model.training_outputs(example["embeddings"], conditions, crop["rater_mask"]),
                             crop["rater_mask"])

    with torch.no_grad():
        before = float(loss_at_seed())
    for _ in range(8):
        optimizer.zero_grad()
        loss_at_seed().backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss_at_seed())
    model.eval()
    assert after < 0.8 * before, (before, after)


def test_rater_ids_and_modes_are_checked(proseg, example):
    emb = example["embeddings"]
    with pytest.raises(ValueError, match="rater id 5 is beyond the 4 raters this model was trained with"):
        proseg.sample_logits(emb, _conditions(example, rater_ids=torch.tensor([5])), 2)
    with pytest.raises(ValueError, match="rater id -1 is not a rater"):
        proseg.training_outputs(emb, _conditions(example, images=example["image"], rater_ids=torch.tensor([-1])),
                                example["rater_mask"])
    with pytest.raises(ValueError, match="must be integers"):
        proseg.sample_logits(emb, _conditions(example, rater_ids=torch.tensor([1.5])), 2)
    with pytest.raises(ValueError, match=r"unknown mode 'mean'.*'diverse'.*'personalised'"):
        proseg.sample_logits(emb, _conditions(example, mode="mean"), 2)
    with pytest.raises(ValueError, match="reads the rater_id"):  # training needs the rater
        proseg.training_outputs(emb, _conditions(example, images=example["image"]), example["rater_mask"])
    with pytest.raises(ValueError, match="reads the image"):  # and the image it reconstructs
        proseg.training_outputs(emb, _conditions(example, rater_ids=torch.tensor([0])), example["rater_mask"])
    with pytest.raises(ValueError, match="needs a box prompt"):
        proseg.sample_logits(emb, Conditions(), 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rater_identity": "by_name"}, "rater_identity must be one of"),
        ({"num_raters": 0}, "sizes must be positive"),
        ({"rater_latent_dim": 1}, "rater_latent_dim must be at least 2"),
        ({"prior_log_variance": float("inf")}, "prior_log_variance must be finite"),
        ({"backbone": "unet", "checkpoint": "x.pth"}, "takes no checkpoint"),
        ({"backbone": "unet", "unet_features": (4, 4, 8)}, "unet_features must be six"),
    ],
)
def test_constructor_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProSeg(**kwargs)


def test_anonymous_raters_share_one_latent(litemedsam, example, crop, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="ambisam.networks.proseg"):
        model = ProSeg(backbone=litemedsam, rater_identity="anonymous")
    infos = [r for r in caplog.records if r.name == "ambisam.networks.proseg"]
    assert len(infos) == 1 and "diverse-only mode" in infos[0].getMessage()
    assert model.num_raters == 1 and model.rater_alphas.shape == (1, 8) and len(model.statistic_heads) == 1
    assert "rater_id" not in model.capabilities.conditions and "rater_id" in ProSeg.capabilities.conditions
    _with_features(model, crop["features"], monkeypatch).eval()
    emb = example["embeddings"]
    with pytest.raises(ValueError, match="trained on anonymous raters: only the diverse mode"):
        model.sample_logits(emb, _conditions(example, mode="personalised"), 2)
    with torch.no_grad():
        seeds = torch.tensor([3])
        plain = model.sample_logits(emb, _conditions(example, noise_seeds=seeds), 3)
        named = model.sample_logits(emb, _conditions(example, noise_seeds=seeds, rater_ids=torch.tensor([9])), 3)
        model.train()
        out = model.training_outputs(emb, _conditions(example, images=crop["image"], rater_ids=torch.tensor([3])),
                                     crop["rater_mask"])
        model.eval()
    assert torch.equal(plain, named)  # the id is ignored, even one out of range
    assert out["rater_ids"].tolist() == [0] and out["rater_logits"].shape == (1, 1)
    loss_function = ProSegLoss()
    loss_function(out, crop["rater_mask"])
    assert loss_function.components()["rater_ce"] == 0.0


def test_unet_option_end_to_end_on_a_small_grid():
    torch.manual_seed(0)
    model = ProSeg(backbone="unet", image_size=32, unet_features=(4, 4, 8, 8, 8, 4))
    assert model.feature_channels == 4 and model.backbone.mask_size == (32, 32)
    images = torch.rand(2, 1, 48, 40)
    embeddings = model.backbone.encode(images)  # (2, 1, 32, 32)
    boxes = torch.tensor([[4.0, 6.0, 20.0, 24.0], [10.0, 2.0, 30.0, 16.0]])
    model.eval()
    with torch.no_grad():
        for mode in ("diverse", "personalised"):
            assert model.sample_logits(embeddings, Conditions(boxes=boxes, mode=mode), 5).shape == (2, 5, 32, 32)
        logits = model(images, torch.tensor([[5.0, 9.0, 25.0, 36.0]] * 2))  # forward: pixel boxes, image size
    assert logits.shape == (2, 1, 48, 40)
    model.train()
    rater_masks = (torch.rand(2, 1, 32, 32) > 0.5).float()
    conditions = Conditions(boxes=boxes, images=embeddings, rater_ids=torch.tensor([0, 2]))
    out = model.training_outputs(embeddings, conditions, rater_masks)
    assert out["logits"].shape == out["reconstruction"].shape == (2, 1, 32, 32)
    assert torch.equal(out["reconstruction_target"], embeddings)
    ProSegLoss()(out, rater_masks).backward()
    assert all(p.grad is not None for p in model.unet.parameters())


def test_the_rater_table_is_saved_with_the_weights_and_checked(tmp_path):
    from ambisam.data import write_datalist
    from ambisam.errors import InputError
    from ambisam.networks import ProSeg, check_rater_table, rater_index, trained_raters

    small = {"backbone": "unet", "num_raters": 3, "image_size": 32, "unet_features": (4, 4, 4, 4, 4, 4)}
    torch.save(ProSeg(rater_names=["ann", "bob", "cy"], **small).state_dict(), tmp_path / "model.pt")
    assert trained_raters(tmp_path / "model.pt") == {"rater_names": ["ann", "bob", "cy"], "rater_identity": "named"}
    assert trained_raters(tmp_path / "absent.pt") is None
    loaded = ProSeg(**small)
    assert loaded.rater_names == ("0", "1", "2")
    loaded.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert loaded.rater_names == ("ann", "bob", "cy")  # the trained names replace the constructor's
    with pytest.raises(ValueError, match="trained with the raters"):
        ProSeg(rater_identity="ranked_by_area", **small).load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert rater_index(loaded.rater_names, "bob") == 1 and rater_index(loaded.rater_names, "2") == 2
    with pytest.raises(InputError, match=r"unknown rater 'dee'.*\['ann', 'bob', 'cy'\]"):
        rater_index(loaded.rater_names, "dee")
    with pytest.raises(InputError, match="unknown rater 3"):
        rater_index(loaded.rater_names, 3)
    # a datalist whose raters are not the trained ones is refused by name; ranked by area only the count matters
    def datalist(raters):
        items = [{"image": str(tmp_path / "a.nii.gz"), "label": [str(tmp_path / f"a{r}.nii.gz") for r in range(3)]}]
        return write_datalist(tmp_path / "-".join(raters), {"training": items}, raters=raters)

    assert check_rater_table(datalist(["ann", "bob", "cy"]), tmp_path / "model.pt") == ["ann", "bob", "cy"]
    with pytest.raises(InputError, match=r"names the raters \['ann', 'cy', 'bob'\]"):
        check_rater_table(datalist(["ann", "cy", "bob"]), tmp_path / "model.pt")
    check_rater_table(datalist(["x", "y", "z"]), tmp_path / "model.pt", rater_order="area")
