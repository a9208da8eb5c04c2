"""pSAM on the real LiteMedSAM backbone: sampling shapes and diversity, one decoder call per image, what is
trained, the posterior/prior KL, and the latent-variable loss (a real optimisation from a cached embedding).

The backbone fixture is shared by the whole session: tests that train work on a deep copy, and every test leaves
the backbone in eval mode. The image is encoded once per session (conftest's ``example``; plus once in the ``forward`` test)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from ambisam.losses import LatentSegmentationLoss
from ambisam.networks import (
    AxisAlignedGaussianEncoder,
    Conditions,
    MaskSamplingNetwork,
    ProbabilisticSam,
    latent_kl_divergence,
    method_registry,
)


@pytest.fixture
def psam(litemedsam):
    """pSAM whose prior and posterior read the embedding (the tests below pass embeddings and boxes only);
    ``prior_input="image"``, the default, has its own tests at the end."""
    torch.manual_seed(0)
    model = ProbabilisticSam(backbone=litemedsam, prior_input="embedding")
    yield model
    litemedsam.eval()  # model.train() switched the shared backbone too


def _batch_of_two(example):
    """Two different 'images': the embedding and its mirror, each with its own box."""
    emb = example["embeddings"]
    x0, y0, x1, y1 = example["boxes"][0].tolist()
    s = emb.shape[-1] * 4
    boxes = torch.tensor([[x0, y0, x1, y1], [s - x1, y0, s - x0, y1]])
    return torch.cat([emb, emb.flip(-1)]), boxes


def _pairwise_distinct(samples: torch.Tensor, tol: float = 1e-3) -> bool:
    """Whether every pair of samples ``(N, H, W)`` differs somewhere by more than ``tol``."""
    return all(
        (samples[i] - samples[j]).abs().max() > tol for i, j in itertools.combinations(range(samples.shape[0]), 2)
    )


def test_registered():
    assert method_registry["psam"].network_class is ProbabilisticSam
    assert issubclass(ProbabilisticSam, MaskSamplingNetwork)


@pytest.mark.parametrize("training", [False, True])
def test_sample_logits_shapes(psam, example, training):
    embeddings, boxes = _batch_of_two(example)
    psam.train(training)
    with torch.no_grad():
        for n in (1, 4, 16):
            assert psam.sample_logits(embeddings, boxes, n).shape == (2, n, 256, 256)


def test_prior_samples_differ_and_eval_single_sample_is_deterministic(psam, example):
    embeddings, boxes = example["embeddings"], example["boxes"]
    with torch.no_grad():
        psam.train()
        assert _pairwise_distinct(psam.sample_logits(embeddings, boxes, 4)[0])
        assert not torch.equal(psam.sample_logits(embeddings, boxes, 1), psam.sample_logits(embeddings, boxes, 1))
        psam.eval()
        assert _pairwise_distinct(psam.sample_logits(embeddings, boxes, 4)[0])
        first = psam.sample_logits(embeddings, boxes, 1)
        assert torch.equal(first, psam.sample_logits(embeddings, boxes, 1))
        prior_mean = psam.prior(embeddings).mean[:, None]  # (1, 1, L)
        assert torch.allclose(first, psam.decode_latents(embeddings, boxes, prior_mean))


def test_decoder_calls_carry_one_images_prompts_prompts_per_call_at_a_time(psam, example, monkeypatch):
    embeddings, boxes = _batch_of_two(example)
    decoder = psam.backbone.mask_decoder
    calls = []
    original = decoder.forward

    def counting_forward(*args, **kwargs):
        calls.append(kwargs["sparse_prompt_embeddings"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(decoder, "forward", counting_forward)
    psam.eval()
    with torch.no_grad():
        torch.manual_seed(3)
        chunked = psam.sample_logits(embeddings, boxes, 16)
        assert calls == [psam.backbone.CPU_PROMPTS_PER_CALL] * (2 * 16 // psam.backbone.CPU_PROMPTS_PER_CALL)
        calls.clear()
        monkeypatch.setattr(psam.backbone, "prompts_per_call", 16)
        torch.manual_seed(3)
        whole = psam.sample_logits(embeddings, boxes, 16)
    assert calls == [16, 16]  # two images, one call each carrying all 16 prompts
    assert torch.allclose(chunked, whole, atol=1e-4)


def test_frozen_encoder_and_trainable_parts(psam):
    assert not any(p.requires_grad for p in psam.backbone.image_encoder.parameters())
    for part in (psam.backbone.prompt_encoder, psam.backbone.mask_decoder, psam.prior_net, psam.posterior_net,
                 psam.latent_to_prompt):
        params = list(part.parameters())
        assert params and all(p.requires_grad for p in params)


def test_training_outputs_and_kl(psam, example):
    embeddings, boxes = _batch_of_two(example)
    rater_masks = torch.cat([example["rater_mask"], example["rater_mask"].flip(-1)])
    psam.train()
    with torch.no_grad():
        out = psam.training_outputs(embeddings, boxes, rater_masks)
        assert out["logits"].shape == (2, 1, 256, 256)
        assert out["kl"].shape == (2,)
        assert (out["kl"] >= 0).all() and (out["kl"] > 0).any()

        # posterior == prior: the posterior net is the prior net with zero weights on the mask channel
        prior_state = psam.prior_net.state_dict()
        posterior_state = {}
        for key, value in psam.posterior_net.state_dict().items():
            src = prior_state[key]
            if value.shape != src.shape:  # the first convolution: one more input channel
                value = torch.zeros_like(value)
                value[:, : src.shape[1]] = src
            else:
                value = src.clone()
            posterior_state[key] = value
        psam.posterior_net.load_state_dict(posterior_state)
        out = psam.training_outputs(embeddings, boxes, rater_masks)
        assert torch.allclose(out["kl"], torch.zeros(2), atol=1e-6)


def test_latent_encoder_and_kl_helper():
    encoder = AxisAlignedGaussianEncoder(in_channels=1, latent_dim=6)
    dist = encoder(torch.rand(2, 1, 256, 256))
    assert dist.batch_shape == (2,) and dist.event_shape == (6,)
    assert dist.rsample().shape == (2, 6)
    with torch.no_grad():
        encoder.head.conv.bias[6:] = 100.0  # log sigma far above the clamp
    assert torch.allclose(encoder(torch.rand(1, 1, 64, 64)).stddev, torch.full((1, 6), torch.e**5))
    assert torch.equal(latent_kl_divergence(dist, dist), torch.zeros(2))
    with pytest.raises(ValueError):
        latent_kl_divergence(dist, encoder(torch.rand(3, 1, 64, 64)))
    with pytest.raises(ValueError):
        encoder(torch.rand(1, 2, 64, 64))


def test_loss_components_and_beta():
    logits = torch.randn(2, 1, 64, 64)
    target = (torch.rand(2, 1, 100, 120) > 0.5).float()  # another size: logits are upsampled to it
    outputs = {"logits": logits, "kl": torch.tensor([0.5, 1.5])}
    without_kl = LatentSegmentationLoss(beta=0.0)
    with_kl = LatentSegmentationLoss(beta=10.0)
    base, total = without_kl(outputs, target), with_kl(outputs, target)
    assert torch.allclose(total - base, torch.tensor(10.0))  # beta * mean KL = 10 * 1
    parts = with_kl.components()
    assert set(parts) == {"bce", "dice", "kl", "kl_weighted", "total"}
    assert parts["kl"] == pytest.approx(1.0) and parts["kl_weighted"] == pytest.approx(10.0)
    assert parts["total"] == pytest.approx(parts["bce"] + parts["dice"] + parts["kl_weighted"], rel=1e-5)
    assert LatentSegmentationLoss()({"logits": logits}, target) == pytest.approx(float(base))  # no KL term
    with pytest.raises(ValueError):
        with_kl({"logits": torch.randn(2, 3, 64, 64)}, target)


def test_loss_decreases_from_cached_embedding(litemedsam, example):
    torch.manual_seed(0)
    # training must not touch the shared weights
    model = ProbabilisticSam(backbone=copy.deepcopy(litemedsam), prior_input="embedding")
    model.train()
    loss_fn = LatentSegmentationLoss(beta=10.0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    embeddings, boxes, rater_mask = example["embeddings"], example["boxes"], example["rater_mask"]
    losses = []
    for step in range(15):
        loss = loss_fn(model.training_outputs(embeddings, boxes, rater_mask), rater_mask)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is None for p in model.backbone.image_encoder.parameters())
            for part in (model.backbone.mask_decoder, model.prior_net, model.posterior_net, model.latent_to_prompt):
                assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert set(loss_fn.last_components) == {"bce", "dice", "kl", "kl_weighted", "total"}
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses


def test_forward_eval_is_one_deterministic_mask(psam, example):
    psam.eval()
    with torch.no_grad():
        logits = psam(example["image"], example["pixel_box"])
    assert logits.shape == (1, 1, 160, 200)
    expected = psam.backbone.postprocess(psam.sample_logits(example["embeddings"], example["boxes"], 1), (160, 200))
    assert torch.allclose(logits, expected, atol=1e-4)


# ------------------------------------------------------------------------------------------------ prior_input="image"
def _image_conditions(example, litemedsam):
    s = litemedsam.image_size
    image = torch.nn.functional.interpolate(example["image"], size=(s, s), mode="bilinear")
    return Conditions(boxes=example["boxes"], images=image)


def test_image_prior_reads_the_image_and_the_posterior_the_mask(litemedsam, example):
    """The reference's setting (the default): the prior reads the image, the posterior the image and the rater
    mask as two channels, so the mask is half of what the posterior sees."""
    torch.manual_seed(0)
    psam = ProbabilisticSam(backbone=litemedsam)
    assert psam.prior_input == "image" and "image" in psam.capabilities.conditions
    assert "image" not in ProbabilisticSam(backbone=litemedsam, prior_input="embedding").capabilities.conditions
    assert psam.prior_net.in_channels == 1 and psam.posterior_net.in_channels == 2
    conditions = _image_conditions(example, litemedsam)
    psam.train()
    with torch.no_grad():
        out = psam.training_outputs(example["embeddings"], conditions, example["rater_mask"])
        assert out["logits"].shape == (1, 1, 256, 256) and out["kl"].shape == (1,) and out["kl"] > 0
        inputs = psam.prior_inputs(example["embeddings"], conditions)
        empty = psam.posterior(inputs, torch.zeros_like(example["rater_mask"])).mean
        assert not torch.allclose(psam.posterior(inputs, example["rater_mask"]).mean, empty)  # the mask moves q
        psam.eval()
        samples = psam.sample_logits(example["embeddings"], conditions, 4)
        assert samples.shape == (1, 4, 256, 256) and _pairwise_distinct(samples[0])
        # a slice at its own size is resized as the training pipeline resizes it
        own_size = Conditions(boxes=example["boxes"], images=example["image"])
        assert psam.prior_inputs(example["embeddings"], own_size).shape == (1, 1, 256, 256)
        with pytest.raises(ValueError, match="reads the image"):
            psam.sample_logits(example["embeddings"], example["boxes"], 2)
        logits = psam(example["image"], example["pixel_box"])  # forward hands the image to the prior
    litemedsam.eval()
    assert logits.shape == (1, 1, 160, 200)
    with pytest.raises(ValueError, match="prior_input must be one of"):
        ProbabilisticSam(backbone=litemedsam, prior_input="pixels")
