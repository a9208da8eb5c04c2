"""Training in slice batches (``train_slice_batch_size``) keeps a step's maths: the same loss and gradients as the
whole batch at once, for SeqSAM's set loss on the real decoder, for a stochastic method (its draws replayed) and
for an output shared by the whole batch (a weight penalty, counted once)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ambisam.engines import MultiRaterTrainer, slice_batches
from ambisam.networks import ImageGridBackbone, MaskSamplingNetwork, MethodCapabilities

GRID = 16


class NoisyShared(MaskSamplingNetwork):
    """Logits from the embedding, a per-image standard normal draw and a weight; an L2 term shared by the batch."""

    capabilities = MethodCapabilities(training_target="rater")
    shared_training_outputs = ("l2",)

    def __init__(self):
        super().__init__(ImageGridBackbone(GRID))
        self.weight = nn.Parameter(torch.tensor(0.7))
        self.scale = nn.Parameter(torch.tensor(0.3))

    def compute_training_outputs(self, embeddings, conditions, targets):
        eps = torch.randn(embeddings.shape[0], 1, 1, 1)
        logits = embeddings[:, :1] * self.weight + eps * self.scale
        return {"logits": logits, "l2": self.weight.pow(2) + self.scale.pow(2), "ids": torch.arange(len(logits))}


def _noisy_loss(outputs, target):
    # a loss over the whole batch at once (not a mean of per-image terms), plus the shared term
    logits = outputs["logits"]
    return (torch.sigmoid(logits) - target).pow(2).sum() / logits.sum().abs().clamp_min(1.0) + 0.1 * outputs["l2"]


def _step(net, loss, batch, slice_batch_size, embedding_cache=None, seed=0):
    """One trainer step (lr 0: the weights do not move); its loss and every trainable parameter's gradient."""
    trainer = MultiRaterTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=[batch], network=net,
        optimizer=torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.0), loss_function=loss,
        embedding_cache=embedding_cache, slice_batch_size=slice_batch_size, decollate=False,
    )
    torch.manual_seed(seed)
    output = trainer._iteration(trainer, batch)
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    return float(output["loss"].detach()), grads, torch.rand(())  # the generator's state after the step


def _assert_same(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-5, abs=1e-6)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert torch.equal(a[2], b[2])  # the random draws after the step are those of the whole batch


def test_slice_batches_cover_the_batch_in_order():
    assert slice_batches(3, None) == [slice(0, 3)] and slice_batches(3, 4) == [slice(0, 3)]
    assert slice_batches(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    with pytest.raises(ValueError, match="slice_batch_size"):
        MultiRaterTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=[], network=NoisyShared(),
                          optimizer=None, loss_function=_noisy_loss, slice_batch_size=0)


def test_a_stochastic_step_with_a_shared_output_is_the_same_in_slice_batches():
    torch.manual_seed(1)
    b = 5
    batch = {"image": torch.rand(b, 1, GRID, GRID), "box": torch.tensor([[2.0, 2, 10, 10]] * b),
             "rater_mask": (torch.rand(b, 1, GRID, GRID) > 0.5).float(), "label": torch.rand(b, 2, GRID, GRID),
             "rater_index": torch.zeros(b, dtype=torch.long), "id": [f"c{i}" for i in range(b)]}
    net = NoisyShared()
    whole = _step(net, _noisy_loss, batch, None)
    for size in (1, 2, 4):
        _assert_same(_step(net, _noisy_loss, batch, size), whole)


def test_seqsam_set_loss_step_is_the_same_in_slice_batches(litemedsam):
    from ambisam.losses import HungarianSetLoss
    from ambisam.networks import SequentialSam

    torch.manual_seed(0)
    b, size = 2, litemedsam.image_size
    net = SequentialSam(litemedsam, num_train_steps=2)
    table = torch.randn(b, litemedsam.embedding_dim, *litemedsam.embedding_size) * 0.1

    def cache(images):  # embeddings by the index written into each image's first pixel: no encoder to pay for
        return table[images[:, 0, 0, 0].round().long()]

    label = torch.zeros(b, 2, size, size)
    label[:, 0, 80:160, 90:170] = 1
    label[:, 1, 70:150, 100:180] = 1
    label[1, 1] = 0  # an empty rater on one slice: fewer matched pairs there
    image = torch.rand(b, 1, size, size)
    image[:, 0, 0, 0] = torch.arange(b, dtype=torch.float32)
    batch = {"image": image, "box": torch.tensor([[80.0, 60, 190, 170]] * b), "label": label,
             "rater_valid": torch.ones(b, 2)}
    loss = HungarianSetLoss()
    whole = _step(net, loss, batch, None, embedding_cache=cache)
    _assert_same(_step(net, loss, batch, 1, embedding_cache=cache), whole)
