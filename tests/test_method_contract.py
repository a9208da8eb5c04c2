"""The method contract as the trainer and the inferer read it, on a tiny method over the U-Net grid backbone (no
encoder to pay for): declared conditions and targets, input checks in the base class, the structure axis, one
draw per volume and sample, the rater id from the batch, ``amp`` and ``prepare_batch`` in the trainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ambisam.engines import MultiRaterTrainer
from ambisam.inferers import SlicewiseSamplingInferer, split_sampling_output
from ambisam.networks import Conditions, ImageGridBackbone, MaskSamplingNetwork, MethodCapabilities

GRID = 32


def _box_mask(boxes: torch.Tensor, size: int) -> torch.Tensor:
    from ambisam.networks.prob_unet import box_masks

    return box_masks(boxes, size)[:, 0]  # (B, S, S)


class CoinPerSample(MaskSamplingNetwork):
    """Sample i marks the box where its standard normal draw is positive; rater 1 always marks it."""

    capabilities = MethodCapabilities(training_target="rater", conditions=("rater_id",))

    def __init__(self):
        super().__init__(ImageGridBackbone(GRID))
        self.bias = nn.Parameter(torch.zeros(()))
        self.seen: list[Conditions] = []
        self.autocast: list[bool] = []

    def draw_samples(self, embeddings, conditions, num_samples):
        self.seen.append(conditions)
        eps = conditions.standard_normal(embeddings.shape[0], num_samples, device=embeddings.device)  # (B, N)
        sign = torch.where(eps > 0, 1.0, -1.0)
        sign = torch.where((conditions.rater_ids == 1)[:, None], torch.ones_like(sign), sign)
        inside = _box_mask(conditions.boxes, GRID)[:, None]  # (B, 1, S, S)
        return torch.where(inside > 0, 10.0 * sign[..., None, None], torch.full_like(inside, -10.0)) + self.bias

    def compute_training_outputs(self, embeddings, conditions, targets):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return {"logits": embeddings[:, :1] * 0 + self.bias}


def _volume(depth=6):
    vol = torch.rand(1, 1, GRID, GRID, depth)
    boxes = -torch.ones(1, 2, depth, 4)
    boxes[0, 0, 1:5] = torch.tensor([4.0, 4.0, 12.0, 12.0])  # structure 0 on slices 1-4
    boxes[0, 1, 3:6] = torch.tensor([18.0, 18.0, 28.0, 28.0])  # structure 1 on slices 3-5
    return vol, boxes


def test_the_base_class_checks_once_what_the_method_declares():
    net = CoinPerSample().eval()
    emb = torch.zeros(2, 1, GRID, GRID)
    boxes = torch.tensor([[1.0, 1, 5, 5]] * 2)
    with pytest.raises(ValueError, match="needs a box prompt"):
        net.sample_logits(emb, Conditions(rater_ids=torch.zeros(2)), 2)
    with pytest.raises(ValueError, match=r"expected boxes of shape \(2, 4\)"):
        net.sample_logits(emb, Conditions(boxes=boxes[:1], rater_ids=torch.zeros(2)), 2)
    with pytest.raises(ValueError, match="reads the rater_id"):
        net.sample_logits(emb, boxes, 2)
    with pytest.raises(ValueError, match="num_samples"):
        net.sample_logits(emb, Conditions(boxes=boxes, rater_ids=torch.zeros(2)), 0)
    assert net.seen == []  # no hook ran on bad input


def test_structures_share_one_encoding_per_slice_and_samples_are_3d_hypotheses():
    torch.manual_seed(0)
    net = CoinPerSample().eval()
    encoded = []
    encode = net.backbone.encode
    net.backbone.encode = lambda images: encoded.append(images.shape[0]) or encode(images)
    vol, boxes = _volume()
    n = 16
    out = SlicewiseSamplingInferer(num_samples=n, slice_batch_size=1)(vol, net, box=boxes, rater_id=0)
    assert out.shape == (1, 2 * (3 + n), GRID, GRID, 6)
    assert len(encoded) == 5  # slices 1-5: each once, for both structures
    maps = split_sampling_output(out[0], num_samples=n)
    assert maps["mean"].shape == (2, GRID, GRID, 6) and maps["samples"].shape == (2 * n, GRID, GRID, 6)
    first = maps["samples"][:n, 8, 8]  # structure 0, inside its box: (N, D)
    assert torch.equal(first[:, 1], first[:, 4]) and 0 < first[:, 1].sum() < n  # one draw per sample, all slices
    assert first[:, 0].sum() == 0  # slice 0 has no prompt
    second = maps["samples"][n:, 20, 20]
    assert torch.equal(second[:, 3], second[:, 5]) and not torch.equal(second[:, 3], first[:, 3])  # its own draw
    # per-slice draws: the slices of a volume disagree
    torch.manual_seed(0)
    out = SlicewiseSamplingInferer(num_samples=n, per_slice_draws=True)(vol, net, box=boxes, rater_id=0)
    per_slice = split_sampling_output(out[0], num_samples=n)["samples"][:n, 8, 8]
    assert not torch.equal(per_slice[:, 1], per_slice[:, 4])


def test_the_rater_id_reaches_the_method_from_the_batch():
    net = CoinPerSample().eval()
    vol, boxes = _volume()
    out = SlicewiseSamplingInferer(num_samples=8)(vol, net, box=boxes[:, :1], rater_id=torch.tensor([1]))
    maps = split_sampling_output(out[0], num_samples=8)
    assert maps["samples"][:, 8, 8, 1:5].all()  # rater 1 always marks the box
    assert net.seen[-1].rater_ids.tolist() == [1] * len(net.seen[-1].rater_ids)


def test_the_trainer_reads_the_declarations_and_honours_amp_and_prepare_batch():
    torch.manual_seed(0)
    net = CoinPerSample()
    batch = {"image": torch.rand(2, 1, GRID, GRID), "box": torch.tensor([[2.0, 2, 10, 10]] * 2),
             "rater_mask": torch.ones(2, 1, GRID, GRID), "label": torch.ones(2, 3, GRID, GRID),
             "rater_index": torch.tensor([0, 2]), "rater_id": torch.tensor([1, 0])}
    prepared = []

    def prepare(batchdata, device=None, non_blocking=False, **kwargs):
        prepared.append(sorted(batchdata))
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batchdata.items()}

    def loss(outputs, target):
        assert target.shape[1] == 1  # the declared target: one rater's mask
        return torch.nn.functional.binary_cross_entropy_with_logits(outputs["logits"], target)

    trainer = MultiRaterTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=[batch, batch], network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1), loss_function=loss, amp=True, prepare_batch=prepare,
    )
    trainer.run()
    assert len(prepared) == 2 and "rater_id" in prepared[0]
    assert net.autocast == [True, True]  # the step ran under autocast
    assert trainer.target_key == "rater_mask" and trainer.conditions(batch).rater_ids.tolist() == [1, 0]
    assert float(net.bias.detach()) > 0  # the optimizer stepped through the scaled loss


def test_the_inferer_conditions_on_its_own_rater_when_the_call_gives_none():
    net = CoinPerSample().eval()
    vol, boxes = _volume()
    out = SlicewiseSamplingInferer(num_samples=8, rater_id=1)(vol, net, box=boxes[:, :1])
    assert split_sampling_output(out[0], num_samples=8)["samples"][:, 8, 8, 1:5].all()
    SlicewiseSamplingInferer(num_samples=2, rater_id=1)(vol, net, box=boxes[:, :1], rater_id=0)
    assert net.seen[-1].rater_ids.tolist() == [0] * len(net.seen[-1].rater_ids)  # the call's rater wins
