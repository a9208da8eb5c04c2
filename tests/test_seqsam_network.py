"""SeqSAM and its MCL baseline on the real LiteMedSAM backbone, and the set losses.

Network: any number of steps without retraining (M = 1, 4, 16), steps that differ, step m's mask prompt is step
m - 1's logits with the same box, one decoder call per step for the whole batch, the frozen encoder and what is
trained. Set loss: cases whose optimal matching is known (a permutation, a brute-force optimum, a greedy trap),
chunking when M > K, empty raters masked out, and winner-takes-all against Hungarian.

The backbone fixture is shared by the whole session: tests that train work on a deep copy, and every test leaves
the backbone in eval mode. The image is encoded once per session (conftest's ``example``; plus once in the ``forward`` test)."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ambisam.losses import HungarianSetLoss, WinnerTakesAllLoss
from ambisam.networks import (
    BoxPromptedSam,
    MaskSamplingNetwork,
    MultipleChoiceSam,
    RecurrentPromptCell,
    SequentialSam,
    method_registry,
)


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def seqsam(litemedsam):
    torch.manual_seed(0)
    model = SequentialSam(backbone=litemedsam).eval()
    yield model
    litemedsam.eval()  # model.train() switched the shared backbone too


def _batch_of_two(example):
    """Two different 'images': the embedding and its mirror, each with its own box."""
    emb = example["embeddings"]
    x0, y0, x1, y1 = example["boxes"][0].tolist()
    s = emb.shape[-1] * 4
    boxes = torch.tensor([[x0, y0, x1, y1], [s - x1, y0, s - x0, y1]])
    return torch.cat([emb, emb.flip(-1)]), boxes


# ----------------------------------------------------------------------------------------------------- network
def test_registered():
    assert method_registry["seqsam"].network_class is SequentialSam and method_registry["mcl"].network_class is MultipleChoiceSam
    assert issubclass(SequentialSam, MaskSamplingNetwork) and issubclass(MultipleChoiceSam, BoxPromptedSam)
    assert SequentialSam.capabilities.target_key == "label" and MultipleChoiceSam.capabilities.target_key == "label"


def test_any_number_of_steps_without_retraining(seqsam, example):
    embeddings, boxes = _batch_of_two(example)
    with torch.no_grad():
        one = seqsam.sample_logits(embeddings[:1], boxes[:1], 1)
        four = seqsam.sample_logits(embeddings, boxes, 4)
        sixteen = seqsam.sample_logits(embeddings[:1], boxes[:1], 16)
    assert one.shape == (1, 1, 256, 256) and four.shape == (2, 4, 256, 256) and sixteen.shape == (1, 16, 256, 256)
    # the same sequence however long it is asked to be, and image 0 does not depend on its batch neighbour
    assert torch.allclose(four[:1, :1], one, atol=1e-4)
    assert torch.allclose(sixteen[:, :4], four[:1], atol=1e-3)
    # the steps differ (before training too: each step sees another mask prompt; untrained, the sequence settles
    # towards SAM refining its own mask, so late steps differ less, and training is what spreads them)
    for image in four:
        for i, j in itertools.combinations(range(4), 2):
            assert (image[i] - image[j]).abs().max() > 1e-2, (i, j)
    assert all((sixteen[0, m] != sixteen[0, m + 1]).any() for m in range(15))
    with pytest.raises(ValueError):
        seqsam.sample_logits(embeddings, None, 4)
    with pytest.raises(ValueError):
        seqsam.sample_logits(embeddings, boxes, 0)


def test_mask_prompt_is_previous_step_and_one_decoder_call_per_step(seqsam, example, monkeypatch):
    embeddings, boxes = _batch_of_two(example)
    backbone = seqsam.backbone
    prompts, masks, decodes = [], [], []
    embed_prompts, dense_prompt_factors, decode = backbone.embed_prompts, backbone.dense_prompt_factors, backbone.decode

    def spy_embed_prompts(boxes=None, masks=None, **kwargs):
        prompts.append((boxes.clone(), masks))
        return embed_prompts(boxes=boxes, masks=masks, **kwargs)

    def spy_dense_prompt_factors(mask_prompt=None, batch_size=1):
        masks.append(None if mask_prompt is None else mask_prompt.clone())
        return dense_prompt_factors(mask_prompt, batch_size=batch_size)

    def spy_decode(embeddings, sparse, dense, multimask=False):
        decodes.append((embeddings.shape[0], sparse.shape[0], multimask))
        return decode(embeddings, sparse, dense, multimask=multimask)

    monkeypatch.setattr(backbone, "embed_prompts", spy_embed_prompts)
    monkeypatch.setattr(backbone, "dense_prompt_factors", spy_dense_prompt_factors)
    monkeypatch.setattr(backbone, "decode", spy_decode)
    with torch.no_grad():
        logits = seqsam.sample_logits(embeddings, boxes, 3)
    assert decodes == [(2, 2, False)] * 3  # one call per step, both images in it, SAM's single-mask output
    # the box is embedded once (its tokens are the same at every step) and the mask prompts step by step
    assert len(prompts) == 1 and torch.equal(prompts[0][0], boxes) and prompts[0][1] is None
    assert len(masks) == 3
    assert masks[0] is None  # step 1: SAM's no-mask embedding
    for m in (1, 2):
        assert masks[m].shape == (2, 1, *backbone.mask_size)
        assert torch.equal(masks[m], logits[:, m - 1 : m])  # step m's prompt: step m - 1's logits


def _literal_steps(model, embeddings, boxes, num_steps):
    """The method as the paper writes it: SAM's prompt encoder on the box and the previous logits, the cell on
    the materialised ``[dense ; h]``, the decoder; the factored path must give the same masks."""
    backbone, steps, hidden, mask_prompt = model.backbone, [], None, None
    for _ in range(num_steps):
        sparse, dense = backbone.embed_prompts(boxes=boxes, masks=mask_prompt)
        dense, hidden = model.recurrent(dense, hidden)
        logits, _ = backbone.decode(embeddings, sparse, dense, multimask=False)
        steps.append(logits)
        mask_prompt = logits
    return torch.cat(steps, dim=1)


def test_factored_steps_equal_the_literal_recurrence(litemedsam, example):
    """With random (not identity) cell weights, so that both halves of both convolutions matter: the same
    logits, thresholded masks and gradients as the literal formulation, for a batch of two."""
    torch.manual_seed(0)
    model = SequentialSam(backbone=copy.deepcopy(litemedsam), identity_init=False).eval()
    with torch.no_grad():
        model.recurrent.to_dense.weight.mul_(0.2)  # keep the random recurrence from saturating every logit
        model.recurrent.to_hidden.weight.mul_(0.2)
    embeddings, boxes = _batch_of_two(example)
    with torch.no_grad():
        fast = model.sample_logits(embeddings, boxes, 5)
        literal = _literal_steps(model, embeddings, boxes, 5)
    scale = literal.abs().max()
    assert (fast - literal).abs().max() <= 1e-5 * scale
    assert torch.equal(fast > 0, literal > 0)
    assert (literal[:, 1:] - literal[:, :-1]).abs().max() > 1e-2  # the steps differ: the comparison is not vacuous

    params = [model.recurrent.to_dense.weight, model.recurrent.to_hidden.weight,
              model.backbone.prompt_encoder.mask_downscaling[-1].weight,
              model.backbone.prompt_encoder.no_mask_embed.weight]
    grads = []
    for run in (model.sample_logits, lambda e, b, m: _literal_steps(model, e, b, m)):
        loss = run(embeddings[:1], boxes[:1], 3).sigmoid().mean()
        grads.append(torch.autograd.grad(loss, params))
    for fast_grad, literal_grad in zip(*grads):
        assert fast_grad.abs().max() > 0
        assert torch.allclose(fast_grad, literal_grad, rtol=1e-3, atol=1e-4 * literal_grad.abs().max())


def test_factored_cell_on_any_prompt(litemedsam):
    """forward_factored = forward on the materialised prompt: no mask, a mask, a prompt given unfactored (an
    encoder whose mask stem ends otherwise), the first step (h = 0) and the last (no next hidden state)."""
    torch.manual_seed(0)
    cell = RecurrentPromptCell(256, identity_init=False)
    masks = torch.randn(2, 1, *litemedsam.mask_size) * 4
    no_mask = litemedsam.dense_prompt_factors(None, batch_size=2)
    with_mask = litemedsam.dense_prompt_factors(masks)
    dense = with_mask.materialize()
    unfactored = type(with_mask)(dense, None, torch.zeros(256), 2, with_mask.size)
    hidden = torch.randn(2, 256, *litemedsam.embedding_size)
    with torch.no_grad():
        assert torch.allclose(no_mask.materialize(), litemedsam.embed_prompts(batch_size=2)[1])
        assert torch.allclose(dense, litemedsam.embed_prompts(boxes=torch.zeros(2, 4), masks=masks)[1], atol=1e-5)
        for prompt in (no_mask, with_mask, unfactored):
            for h in (None, hidden):
                expected = cell(prompt.materialize(), h)
                got = cell.forward_factored(prompt, h)
                for e, g in zip(expected, got):
                    assert g.shape == e.shape == (2, 256, 64, 64)
                    assert (g - e).abs().max() <= 1e-5 * e.abs().max()
        last_dense, no_hidden = cell.forward_factored(with_mask, hidden, next_hidden=False)
        assert no_hidden is None and torch.allclose(last_dense, cell(dense, hidden)[0], atol=1e-4)
    with pytest.raises(ValueError):
        cell.forward_factored(with_mask, hidden[:1])
    with pytest.raises(ValueError):
        RecurrentPromptCell(128).forward_factored(with_mask)


def test_recurrent_cell(example):
    torch.manual_seed(0)
    cell = RecurrentPromptCell(256)
    dense = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        out, hidden = cell(dense)
        assert torch.allclose(out, dense, atol=1e-6)  # identity initialisation of the dense output
        zero_out, zero_hidden = cell(dense, torch.zeros_like(dense))
        assert torch.allclose(out, zero_out, atol=1e-5) and torch.allclose(hidden, zero_hidden, atol=1e-5)  # h_0 = 0
        assert cell.to_dense.weight.shape == (256, 512, 3, 3) and cell.to_hidden.weight.shape == (256, 512, 3, 3)
        default = RecurrentPromptCell(256, identity_init=False)
        assert not torch.allclose(default(dense)[0], dense)
    with pytest.raises(ValueError):
        cell(torch.randn(1, 128, 8, 8))
    with pytest.raises(ValueError):
        RecurrentPromptCell(256, kernel_size=2)


def test_frozen_encoder_and_trainable_parts(seqsam):
    assert not any(p.requires_grad for p in seqsam.backbone.image_encoder.parameters())
    for part in (seqsam.backbone.prompt_encoder, seqsam.backbone.mask_decoder, seqsam.recurrent):
        params = list(part.parameters())
        assert params and all(p.requires_grad for p in params)
    seqsam.train()
    assert not seqsam.backbone.image_encoder.training and seqsam.backbone.mask_decoder.training


def test_training_step_from_cached_embedding(litemedsam, example):
    """M = max(K, num_train_steps) steps; gradients reach the recurrent module, the decoder and the prompt
    encoder's mask path (through the step-to-step mask prompt), never the encoder; a few steps lower the loss."""
    torch.manual_seed(0)
    model = SequentialSam(backbone=copy.deepcopy(litemedsam), num_train_steps=2).train()
    embeddings, boxes, mask = example["embeddings"], example["boxes"], example["rater_mask"]
    grown = (F.max_pool2d(mask, 9, stride=1, padding=4) > 0).float()
    targets = torch.cat([mask, grown], dim=1)  # K = 2 raters: the ellipse and a wider one
    with torch.no_grad():
        three_raters = torch.cat([targets, mask], dim=1)
        assert model.training_outputs(embeddings, boxes, three_raters)["logits"].shape[1] == 3  # M = max(K, 2)
    loss_fn = HungarianSetLoss()
    assert isinstance(loss_fn, HungarianSetLoss)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    losses = []
    for step in range(3):
        outputs = model.training_outputs(embeddings, boxes, targets)
        assert outputs["logits"].shape == (1, 2, 256, 256)
        loss = loss_fn(outputs, targets)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is None for p in model.backbone.image_encoder.parameters())
            for part in (model.recurrent.to_dense, model.backbone.mask_decoder,
                         model.backbone.prompt_encoder.mask_downscaling):
                assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
        optimizer.step()
        losses.append(loss.item())
    # the hidden path: zero-initialised in the dense output, so it gets a gradient once that weight has moved
    assert model.recurrent.to_hidden.weight.grad.abs().sum() > 0
    assert losses[-1] < losses[0], losses


def test_forward_eval_is_step_one(seqsam, example):
    with torch.no_grad():
        logits = seqsam(example["image"], example["pixel_box"])
        expected = seqsam.backbone.postprocess(seqsam.sample_logits(example["embeddings"], example["boxes"], 1),
                                               (160, 200))
    assert logits.shape == (1, 1, 160, 200)
    assert torch.allclose(logits, expected, atol=1e-4)


def test_mcl_heads_cycle_and_train(litemedsam, example):
    model = MultipleChoiceSam(backbone=litemedsam).eval()
    embeddings, boxes = example["embeddings"], example["boxes"]
    with torch.no_grad():
        heads = model.heads(embeddings, boxes)
        samples = model.sample_logits(embeddings, boxes, 7)
    assert heads.shape == (1, 3, 256, 256) and samples.shape == (1, 7, 256, 256)
    for i in range(7):
        assert torch.equal(samples[:, i], heads[:, i % 3])
    assert not any(p.requires_grad for p in model.backbone.image_encoder.parameters())
    assert all(p.requires_grad for p in model.backbone.mask_decoder.parameters())
    with torch.no_grad():
        out = model.training_outputs(embeddings, boxes, example["rater_mask"].repeat(1, 4, 1, 1))
    assert torch.equal(out["logits"], heads)


# --------------------------------------------------------------------------------------------------- set loss
def _logits(masks: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Confident logits reproducing binary masks."""
    return scale * (2 * masks - 1)


def _raters(k: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """``(1, K, S, S)`` distinct non-empty rater masks: squares of different positions and sizes."""
    rng = np.random.default_rng(seed)
    masks = torch.zeros(1, k, size, size)
    for i in range(k):
        y, x = rng.integers(0, size // 2, 2)
        side = 3 + i
        masks[0, i, y : y + side, x : x + side] = 1
    return masks


def test_hungarian_finds_the_permutation():
    target = _raters(4)
    perm = [2, 0, 3, 1]
    loss_fn = HungarianSetLoss()
    loss = loss_fn({"logits": _logits(target[:, perm])}, target)
    assert loss.item() < 1e-3
    assert set(loss_fn.components()) == {"dice", "bce", "matched", "total"}
    assert loss_fn.components()["matched"] == 4
    # a shifted assignment (the identity here) would cost much more
    pair = loss_fn.pairwise_dice_loss(_logits(target[:, perm]), target)[0]
    assert pair[torch.arange(4), torch.arange(4)].mean() > 0.5


def test_hungarian_equals_brute_force_optimum():
    torch.manual_seed(0)
    target = (torch.rand(3, 4, 12, 12) > 0.6).float()
    logits = torch.randn(3, 4, 12, 12) * 3
    loss_fn = HungarianSetLoss()
    loss = loss_fn({"logits": logits}, target)
    pair = loss_fn.pairwise_dice_loss(logits, target)
    best = [min(sum(float(pair[b, i, p[i]]) for i in range(4)) / 4 for p in itertools.permutations(range(4)))
            for b in range(3)]
    assert loss.item() == pytest.approx(sum(best) / 3, rel=1e-5)


def test_hungarian_is_not_greedy():
    """Greedy matching takes the single best pair (prediction 0 -> rater 0) and pays for the rest; the optimum
    gives that pair up."""
    target = torch.zeros(1, 2, 1, 10)
    target[0, 0, 0, :4] = 1  # rater 0: pixels 0..3
    target[0, 1, 0, :2] = 1  # rater 1: pixels 0..1
    masks = torch.zeros(1, 2, 1, 10)
    masks[0, 0, 0, :3] = 1  # prediction 0: pixels 0..2, close to both raters
    masks[0, 1, 0, :4] = 1  # prediction 1: exactly rater 0
    loss_fn = HungarianSetLoss(squared_pred=False)
    pair = loss_fn.pairwise_dice_loss(_logits(masks), target)[0]
    greedy = (pair[0, 0] + pair[1, 1]) / 2
    optimal = (pair[0, 1] + pair[1, 0]) / 2
    assert optimal < greedy
    assert loss_fn({"logits": _logits(masks)}, target).item() == pytest.approx(optimal.item(), rel=1e-5)


def test_chunking_keeps_one_prediction_per_group():
    loss_fn = HungarianSetLoss()
    steps = torch.arange(8.0).view(1, 8, 1, 1).expand(50, 8, 2, 2)  # logits carry their step index
    picked = loss_fn.select(steps, 2)[:, :, 0, 0]
    assert picked.shape == (50, 2)
    assert set(picked[:, 0].tolist()) == {0, 1, 2, 3} and set(picked[:, 1].tolist()) == {4, 5, 6, 7}
    # 5 predictions, 4 raters: always 4 groups ([0, 1], [2], [3], [4]); the reference's ceil-sized chunks give 3
    picked = loss_fn.select(torch.arange(5.0).view(1, 5, 1, 1).expand(30, 5, 1, 1), 4)[:, :, 0, 0]
    assert set(picked[:, 0].tolist()) == {0, 1} and (picked[:, 1:] == torch.tensor([2.0, 3.0, 4.0])).all()
    assert torch.equal(loss_fn.select(steps[:1, :2], 2), steps[:1, :2])  # M == K: nothing dropped


def test_chunking_in_the_loss_and_gradients_only_for_kept_predictions():
    target = _raters(2)
    # group 0 (steps 0..3) all reproduce rater 1, group 1 (steps 4..7) all rater 0: whatever is drawn, the
    # matching crosses over and the loss is ~0
    masks = torch.cat([target[:, 1:2].expand(1, 4, -1, -1), target[:, 0:1].expand(1, 4, -1, -1)], dim=1)
    logits = _logits(masks).requires_grad_(True)
    loss_fn = HungarianSetLoss()
    torch.manual_seed(1)
    loss = loss_fn({"logits": logits}, target)
    assert loss.item() < 1e-3 and loss_fn.components()["matched"] == 2
    # soft logits so that every kept prediction has a gradient: exactly one per group
    soft = (torch.randn(1, 8, 16, 16) * 0.1).requires_grad_(True)
    loss_fn({"logits": soft}, target).backward()
    has_grad = soft.grad.flatten(2).abs().sum(-1)[0] > 0
    assert has_grad[:4].sum() == 1 and has_grad[4:].sum() == 1


def test_empty_raters_are_masked_out():
    target = _raters(3)
    target[:, 1] = 0  # rater 1 drew nothing
    masks = torch.stack([target[0, 2], torch.ones(16, 16), target[0, 0]])[None]  # prediction 1 is junk
    logits = _logits(masks).requires_grad_(True)
    loss_fn = HungarianSetLoss()
    loss = loss_fn({"logits": logits}, target)
    assert loss.item() < 1e-3 and loss_fn.components()["matched"] == 2  # the junk is matched to nothing
    loss.backward()
    assert logits.grad[0, 1].abs().sum() == 0
    # counted as a mask, the empty rater takes the junk prediction and costs
    assert HungarianSetLoss(mask_empty_raters=False)({"logits": logits}, target).item() > 0.3
    # an explicit validity mask overrides emptiness
    valid = torch.tensor([[True, False, False]])
    assert loss_fn({"logits": logits}, target, rater_valid=valid).item() < 1e-3
    assert loss_fn.components()["matched"] == 1
    with pytest.raises(ValueError):
        loss_fn({"logits": logits}, target, rater_valid=torch.ones(1, 2, dtype=torch.bool))


def test_batch_without_any_rater_gives_zero_loss_with_a_graph():
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss = HungarianSetLoss()({"logits": logits}, torch.zeros(2, 4, 8, 8))
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert logits.grad.abs().sum() == 0


def test_logits_upsampled_to_target_and_bce_term():
    target = _raters(2, size=32)
    logits = F.interpolate(_logits(target), size=(16, 16), mode="bilinear", align_corners=False)
    loss_fn = HungarianSetLoss(bce_weight=1.0)
    loss = loss_fn({"logits": logits}, target)
    parts = loss_fn.components()
    assert parts["total"] == pytest.approx(parts["dice"] + parts["bce"], rel=1e-5) and parts["bce"] > 0
    assert loss.item() < 0.5
    with pytest.raises(ValueError):
        loss_fn({"pred": logits}, target)
    with pytest.raises(ValueError):
        loss_fn({"logits": logits[0]}, target)
    with pytest.raises(ValueError):
        HungarianSetLoss(bce_weight=-1)


def test_winner_takes_all_against_hungarian():
    target = _raters(2)
    target[:, 1] = target[:, 0]  # two raters drew the same mask
    heads = torch.stack([target[0, 0], torch.ones(16, 16), torch.zeros(16, 16)])[None]  # one good head, two junk
    logits = _logits(heads).requires_grad_(True)
    wta = WinnerTakesAllLoss()
    loss = wta({"logits": logits}, target)
    assert loss.item() < 1e-3 and wta.components()["matched"] == 2  # the good head wins both raters
    loss.backward()
    assert logits.grad[0, 1:].abs().sum() == 0 and logits.grad[0, 0].abs().sum() > 0
    # one-to-one matching must give one rater to a junk head
    assert HungarianSetLoss()({"logits": logits}, target).item() > 0.4
