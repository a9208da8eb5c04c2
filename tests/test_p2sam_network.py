"""P2SAM on the real LiteMedSAM backbone: the diversity-aware assembling, stage 1 (LoRA-adapted SAM, what trains, a
real training step with and without gradient checkpointing), stage 2 made from stage 1 (merged LoRA, every stage-1
weight kept, what trains, stochastic samples, shared draws per seed) and the loss.

Every network works on a deep copy of the session backbone; the image is encoded three times in the module (the
adapted stage-1 encoder, the merged stage-2 encoder, one ``forward``) besides the training steps."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from ambisam.losses import P2SamLoss
from ambisam.networks import Conditions, DiversityAwareAssembling, MaskSamplingNetwork, P2Sam, method_registry
from ambisam.networks.p2sam import set_block_checkpointing
from ambisam.sam import lora_parameters


@pytest.fixture(scope="module")
def stage1(litemedsam):
    torch.manual_seed(0)
    return P2Sam(copy.deepcopy(litemedsam), stage=1).eval()


@pytest.fixture(scope="module")
def image256(example, litemedsam):
    return F.interpolate(example["image"], size=(litemedsam.image_size,) * 2, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def adapted(stage1, litemedsam, example):
    """A stage-1 network as if trained (random LoRA B, assembling weights), a stage-2 network loaded from its state
    dict, and each one's embedding of the example image."""
    torch.manual_seed(1)
    trained = copy.deepcopy(stage1)
    with torch.no_grad():
        for p in lora_parameters(trained):
            p.normal_(0, 0.02)
        trained.assembling_weights.free_weights.uniform_(0.0, 0.2)
    stage2 = P2Sam(copy.deepcopy(litemedsam), stage=2)
    result = stage2.load_state_dict(trained.state_dict(), strict=False)
    stage2.eval()
    with torch.no_grad():
        emb1 = trained.backbone.encode(example["image"])
        emb2 = stage2.backbone.encode(example["image"])
    return {"stage1": trained, "stage2": stage2, "load": result, "emb1": emb1, "emb2": emb2}


def _pairwise_distinct(samples: torch.Tensor, tol: float = 1e-3) -> bool:
    return all((samples[i] - samples[j]).abs().max() > tol for i, j in itertools.combinations(range(len(samples)), 2))


def test_registered():
    assert method_registry["p2sam"].network_class is P2Sam
    assert issubclass(P2Sam, MaskSamplingNetwork)


# ------------------------------------------------------------------------------------------------- assembling
def test_assembling_weights_sum_to_one_and_start_uniform():
    assembling = DiversityAwareAssembling(8)
    assert assembling.free_weights.shape == (7,)
    assert torch.allclose(assembling.weights, torch.full((8,), 1 / 8))
    with torch.no_grad():
        assembling.free_weights.copy_(torch.linspace(-0.3, 0.5, 7))
    assert torch.allclose(assembling.weights.sum(), torch.tensor(1.0))
    mask = torch.randn(2, 1, 16, 16)
    assert torch.allclose(assembling(mask.expand(-1, 8, -1, -1)), mask, atol=1e-6)
    with pytest.raises(ValueError):
        assembling(torch.randn(2, 3, 16, 16))


# ---------------------------------------------------------------------------------------------------- stage 1
def test_stage1_trains_lora_prompt_encoder_decoder_and_assembling(stage1):
    assert stage1.capabilities.encoder == "trainable" and not stage1.capabilities.needs_prompt
    assert stage1.capabilities.training_target == "rater" and not stage1.capabilities.stochastic
    assert stage1.backbone.num_multimask_outputs == 8
    trainable = {n for n, p in stage1.named_parameters() if p.requires_grad}
    allowed = ("backbone.prompt_encoder.", "backbone.mask_decoder.", "assembling_weights.")
    assert all("lora_" in n or n.startswith(allowed) for n in trainable)
    encoder = {n for n in trainable if n.startswith("backbone.image_encoder.")}
    assert encoder and all("lora_" in n for n in encoder)
    assert all(p.requires_grad for p in stage1.backbone.mask_decoder.parameters())
    assert all(p.requires_grad for p in stage1.backbone.prompt_encoder.parameters())
    assert stage1.assembling_weights.free_weights.requires_grad
    assert stage1.l2_parameters() == []


def test_stage1_lora_starts_at_pretrained_encoder(stage1, example):
    with torch.no_grad():
        embeddings = stage1.backbone.encode(example["image"])
    assert torch.allclose(embeddings, example["embeddings"], atol=1e-5)


def test_stage1_forward_eval_returns_one_map(stage1, example):
    with torch.no_grad():
        out = stage1(example["image"])
        samples = stage1.sample_logits(example["embeddings"], None, 3)
    assert out.shape == (1, 1, *example["image"].shape[-2:])
    assert samples.shape == (1, 3, 256, 256) and torch.equal(samples[:, 0], samples[:, 2])


def test_block_checkpointing_keeps_outputs_gradients_and_keys(stage1):
    block_owner = copy.deepcopy(stage1.backbone.image_encoder.layers[-1]).train()
    block = block_owner.blocks[0]  # a TinyViT block with LoRA on its qkv
    with torch.no_grad():
        for p in lora_parameters(block):
            p.normal_(0, 0.02)
    keys = list(block_owner.state_dict())
    x = torch.randn(1, block.input_resolution[0] * block.input_resolution[1], block.dim)
    grads = []
    for checkpointing in (False, True):
        assert set_block_checkpointing(block_owner, checkpointing) == len(block_owner.blocks)
        block.zero_grad()
        out = block(x)  # x needs no grad: non-reentrant checkpointing still reaches the adapters
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in lora_parameters(block)]))
    assert list(block_owner.state_dict()) == keys
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads[1][1])
    assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-5) for a, b in zip(grads[0][1], grads[1][1]))


def test_stage1_training_step_changes_the_embeddings(stage1, example, image256):
    net = copy.deepcopy(stage1).train()
    loss_fn = P2SamLoss()
    target = example["rater_mask"]
    outputs = net(image256, Conditions(), target, training_outputs=True)
    assert outputs["logits"].shape == (1, 1, 256, 256) and float(outputs["l2"]) == 0.0
    loss_fn(outputs, target).backward()
    assert set(loss_fn.components()) == {"ce", "dice", "focal", "l2", "l2_weighted", "total"}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(net))
    assert net.assembling_weights.free_weights.grad.abs().sum() > 0
    torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3).step()
    net.eval()
    with torch.no_grad():
        embeddings = net.backbone.encode(example["image"])
    assert (embeddings - example["embeddings"]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------- stage 2
def test_stage2_loads_every_stage1_weight(adapted, example):
    stage1, stage2, result = adapted["stage1"], adapted["stage2"], adapted["load"]
    assert not result.unexpected_keys
    assert all(k.startswith(("prompt_generator.", "dense_prompt_mapping.")) for k in result.missing_keys)
    state2 = stage2.state_dict()
    plain = {k: v for k, v in stage1.state_dict().items() if ".qkv." not in k}
    assert all(torch.equal(state2[k], v) for k, v in plain.items())
    assert torch.allclose(stage2.assembling_weights.weights, stage1.assembling_weights.weights)
    # the LoRA keys arrive merged: the encoders agree
    assert (adapted["emb1"] - adapted["emb2"]).abs().max() < 1e-5 * max(1.0, adapted["emb1"].abs().max().item())
    assert (adapted["emb2"] - example["embeddings"]).abs().max() > 1e-3  # and differ from the pretrained one
    # a stage-2 state dict loads strictly into a stage-2 network
    fresh = P2Sam(copy.deepcopy(stage2.backbone), stage=2)
    fresh.load_state_dict(state2)


def test_stage2_trains_only_the_prompt_layers(adapted):
    stage2 = adapted["stage2"]
    caps = stage2.capabilities
    assert caps.encoder == "frozen" and caps.conditions == ("image",) and caps.stochastic and not caps.needs_prompt
    assert not any(p.requires_grad for p in stage2.backbone.parameters())
    assert not stage2.assembling_weights.free_weights.requires_grad
    new = [*stage2.prompt_generator.parameters(), *stage2.dense_prompt_mapping.parameters()]
    assert new and all(p.requires_grad for p in new)
    assert {id(p) for p in stage2.l2_parameters()} == {id(p) for p in new}
    assert {id(p) for p in stage2.parameters() if p.requires_grad} == {id(p) for p in new}


def test_stage2_samples_differ_and_eval_single_sample_is_the_mean(adapted, image256):
    stage2, embeddings = adapted["stage2"], adapted["emb2"]
    conditions = Conditions(images=image256)
    with torch.no_grad():
        samples = stage2.sample_logits(embeddings, conditions, 3)
        first = stage2.sample_logits(embeddings, conditions, 1)
        again = stage2.sample_logits(embeddings, conditions, 1)
        mean = stage2.prompt_distribution(image256).mean[:, None]
        expected = stage2.fuse(stage2.decode_mask_logits(embeddings, mean))
    assert samples.shape == (1, 3, 256, 256) and _pairwise_distinct(samples[0])
    assert torch.equal(first, again)
    assert torch.allclose(first, expected)


def test_stage2_shared_seed_gives_one_draw_and_images_are_required(adapted, example, image256):
    stage2 = adapted["stage2"]
    images = torch.cat([image256, 1 - image256])
    conditions = Conditions(images=images, noise_seeds=torch.tensor([7, 7]))
    with torch.no_grad():
        latents = stage2.draw_latents(conditions, 3)  # (2, 3, L)
        prompt = stage2.prompt_distribution(images)
    eps = (latents - prompt.mean[:, None]) / prompt.stddev[:, None]
    assert not torch.allclose(prompt.mean[0], prompt.mean[1])
    assert torch.allclose(eps[0], eps[1], atol=1e-4)
    with pytest.raises(ValueError, match="image"):
        stage2.sample_logits(adapted["emb2"], Conditions(), 1)
    with torch.no_grad():  # forward alone: the prompt generator reads the images it is given
        assert stage2(example["image"]).shape == (1, 1, *example["image"].shape[-2:])


def test_stage2_training_step_reaches_only_the_prompt_layers(adapted, example, image256):
    stage2 = copy.deepcopy(adapted["stage2"]).train()
    loss_fn = P2SamLoss(l2_weight=1e-5)
    outputs = stage2.training_outputs(adapted["emb2"], Conditions(images=image256), example["rater_mask"])
    assert outputs["logits"].shape == (1, 1, 256, 256) and outputs["mask_logits"].shape == (1, 8, 256, 256)
    loss_fn(outputs, example["rater_mask"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage2.dense_prompt_mapping.parameters())
    assert stage2.prompt_generator.head.conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in stage2.backbone.parameters())


# ------------------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("classification", ["bce", "weighted_masks"])
def test_loss_decreases_on_a_tiny_problem(classification):
    torch.manual_seed(0)
    target = torch.zeros(2, 1, 32, 32)
    target[:, :, 8:20, 10:24] = 1
    masks = torch.nn.Parameter(torch.randn(2, 8, 16, 16))
    assembling = DiversityAwareAssembling(8)
    loss_fn = P2SamLoss(classification=classification)
    optimizer = torch.optim.Adam([masks, *assembling.parameters()], lr=0.1)
    losses = []
    for _ in range(15):
        outputs = {"logits": assembling(masks), "mask_logits": masks, "assembling_weights": assembling.weights}
        loss = loss_fn(outputs, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]


def test_loss_l2_term_is_the_weighted_sum_of_squares():
    logits = torch.randn(1, 1, 16, 16)
    target = (torch.rand(1, 1, 32, 32) > 0.5).float()
    params = [torch.randn(3, 4), torch.randn(5)]
    l2 = sum(p.pow(2).sum() for p in params)
    without = P2SamLoss(l2_weight=0.0)({"logits": logits}, target)
    loss_fn = P2SamLoss(l2_weight=1e-5)
    with_l2 = loss_fn({"logits": logits, "l2": l2}, target)
    assert torch.allclose(with_l2 - without, 1e-5 * l2, atol=1e-7)
    assert loss_fn.components()["l2"] == pytest.approx(float(l2))
    with pytest.raises(ValueError):
        P2SamLoss(classification="softmax")
