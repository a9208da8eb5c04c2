"""The slicewise sampling inferer: layout, prompts per slice, one encoding per slice, uncertainty maps."""

from __future__ import annotations

import pytest
import torch

from ambisam.inferers import SlicewiseSamplingInferer, binary_entropy, split_sampling_output
from ambisam.networks import BoxPromptedSam, MaskSamplingNetwork
from ambisam.sam import EmbeddingCache


class CoinFlipNetwork(MaskSamplingNetwork):
    """A stochastic stand-in method: each sample keeps the left half of the box always and the right half
    with probability 1/2, so samples agree on the left and disagree on the right."""

    def __init__(self, backbone):
        super().__init__(backbone)
        self.calls = []

    def draw_samples(self, embeddings, conditions, num_samples):
        boxes = conditions.boxes
        self.calls.append((embeddings.shape[0], num_samples))
        b = embeddings.shape[0]
        s = self.backbone.mask_size[0]
        logits = torch.full((b, num_samples, s, s), -10.0)
        for i in range(b):
            x0, y0, x1, y1 = boxes[i].round().long().tolist()
            xm = (x0 + x1) // 2
            logits[i, :, y0:y1, x0:xm] = 10.0
            keep = torch.rand(num_samples) < 0.5
            keep[0], keep[1] = True, False  # both outcomes occur
            logits[i, keep, y0:y1, xm:x1] = 10.0
        return logits


def _volume():
    vol = torch.zeros(1, 1, 64, 64, 4)
    vol[0, 0, 16:48, 16:48, 1] = 0.8
    vol[0, 0, 16:48, 16:48, 2] = 0.6  # distinct slices, distinct cache keys
    box = -torch.ones(1, 4, 4)
    box[0, 1:3] = torch.tensor([16.0, 16.0, 47.0, 47.0])
    return vol, box


def test_binary_entropy_values():
    p = torch.tensor([0.0, 0.5, 1.0, 0.25])
    assert torch.allclose(binary_entropy(p), torch.tensor([0.0, 1.0, 0.0, 0.811278]), atol=1e-5)


def test_layout_and_unprompted_slices_are_background(litemedsam):
    vol, box = _volume()
    net = CoinFlipNetwork(litemedsam)
    cache = EmbeddingCache(litemedsam)
    out = SlicewiseSamplingInferer(num_samples=8, cache=cache)(vol, net, box=box)
    assert out.shape == (1, 3 + 8, 64, 64, 4)
    assert cache.misses == 2  # only the two prompted slices were encoded
    assert net.calls == [(2, 8)]  # one batched call drew all 8 samples of both slices
    assert torch.count_nonzero(out[..., 0]) == 0 and torch.count_nonzero(out[..., 3]) == 0
    maps = split_sampling_output(out[0])
    samples = maps["samples"]
    assert samples.shape == (8, 64, 64, 4)
    assert set(samples.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(samples[0], samples[1])  # a probabilistic method's samples differ
    assert torch.allclose(maps["mean"][0], samples.mean(0))
    agree = (samples == samples[:1]).all(0)
    assert agree.any() and (~agree).any()
    assert torch.count_nonzero(maps["uncertainty"][0][agree]) == 0  # zero where all samples agree
    assert (maps["uncertainty"][0][~agree] > 0).all()
    assert torch.equal(maps["pred"][0], (maps["mean"][0] > 0.5).float())
    assert (maps["variance"] >= 0).all() and (maps["variance"][0][~agree] > 0).all()
    assert maps["variance"].max() <= 0.25 + 1e-6  # a variance of values in [0, 1]


def test_keep_probabilities_appends_each_samples_probability_map(litemedsam):
    vol, box = _volume()
    torch.manual_seed(0)
    plain = SlicewiseSamplingInferer(num_samples=6)(vol, CoinFlipNetwork(litemedsam), box=box)
    torch.manual_seed(0)
    out = SlicewiseSamplingInferer(num_samples=6, keep_probabilities=True)(vol, CoinFlipNetwork(litemedsam), box=box)
    assert out.shape == (1, 3 + 2 * 6, 64, 64, 4)
    assert torch.equal(out[:, : 3 + 6], plain)  # the binary layout is unchanged, the maps come after it
    maps = split_sampling_output(out[0], probabilities=True)
    assert maps["probabilities"].shape == maps["samples"].shape == (6, 64, 64, 4)
    probs = maps["probabilities"][..., 1:3]
    assert torch.equal((probs > 0.5).float(), maps["samples"][..., 1:3])
    assert ((probs > 0) & (probs < 1)).all()  # sigmoid probabilities, not 0/1 samples
    assert torch.allclose(probs.max(), torch.sigmoid(torch.tensor(10.0)), atol=1e-4)
    assert torch.equal(split_sampling_output(out[0], num_samples=6, probabilities=True)["samples"], maps["samples"])


def test_cache_serves_a_second_pass(litemedsam):
    vol, box = _volume()
    cache = EmbeddingCache(litemedsam)
    inferer = SlicewiseSamplingInferer(num_samples=2, cache=cache, slice_batch_size=1)
    net = CoinFlipNetwork(litemedsam)
    inferer(vol, net, box=box)
    inferer(vol, net, box=box)
    assert (cache.hits, cache.misses) == (2, 2)
    assert net.calls == [(1, 2)] * 4


def test_deterministic_baseline_on_2d_input(litemedsam):
    image = torch.zeros(1, 1, 96, 96)
    yy, xx = torch.meshgrid(torch.arange(96), torch.arange(96), indexing="ij")
    disk = ((yy - 48) ** 2 + (xx - 40) ** 2) < 20**2
    image[0, 0][disk] = 0.9
    out = SlicewiseSamplingInferer(num_samples=4)(image, BoxPromptedSam(litemedsam), box=torch.tensor([[20.0, 28, 60, 68]]))
    assert out.shape == (1, 7, 96, 96)
    maps = split_sampling_output(out[0])
    assert torch.equal(maps["samples"], maps["samples"][:1].expand(4, -1, -1))  # deterministic: all equal
    assert torch.count_nonzero(maps["uncertainty"]) == 0
    inter = (maps["pred"][0].bool() & disk).sum().item()
    assert 2 * inter / (maps["pred"].sum().item() + disk.sum().item()) > 0.9


def test_prompt_errors(litemedsam):
    vol, box = _volume()
    inferer = SlicewiseSamplingInferer(num_samples=2)
    with pytest.raises(ValueError, match="needs a box prompt"):
        inferer(vol, BoxPromptedSam(litemedsam))
    with pytest.raises(ValueError, match="expected 4 per-slice boxes"):
        inferer(vol, BoxPromptedSam(litemedsam), box=box[:, :3])
    with pytest.raises(ValueError, match="num_samples"):
        SlicewiseSamplingInferer(num_samples=0)


class ThresholdNetwork(MaskSamplingNetwork):
    """A prompt-free stand-in that reads the image: foreground where the image it is given is bright."""

    capabilities = MaskSamplingNetwork.capabilities._replace(needs_prompt=False, conditions=("image",), stochastic=False)

    def __init__(self, backbone):
        super().__init__(backbone)
        self.seen = []

    def draw_samples(self, embeddings, conditions, num_samples):
        self.seen.append(conditions.images.clone())
        low = torch.nn.functional.interpolate(conditions.images[:, :1].float(), size=self.backbone.mask_size)
        return (20 * (low - 0.5)).expand(-1, num_samples, -1, -1)


def test_region_of_interest_window_is_sampled_and_put_back(litemedsam):
    vol = torch.zeros(1, 1, 80, 80, 3)
    vol[0, 0, 10:20, 60:70, 1] = 1.0  # the lesion: rows 10-19, columns 60-69 (near the top-right border)
    vol[0, 0, 60:75, 5:20, 1] = 1.0  # something bright far from it
    vol[0, 0, 60:75, 5:20, 2] = 1.0
    box = -torch.ones(1, 3, 4)
    box[0, 1] = torch.tensor([60.0, 10.0, 69.0, 19.0])  # [x_min, y_min, x_max, y_max]
    net = ThresholdNetwork(litemedsam)
    out = SlicewiseSamplingInferer(num_samples=2, roi_size=32)(vol, net, box=box)
    assert out.shape == (1, 3 + 2, 80, 80, 3)
    assert len(net.seen) == 1 and net.seen[0].shape == (1, 1, 32, 32)  # one window, the prompted slice only
    window = net.seen[0][0, 0]
    # centred on the box: centre (14, 64), window rows -1..30, columns 49..80: row -1 and column 80 are padding
    assert torch.equal(window[1:, :31], vol[0, 0, 0:31, 49:80, 1])
    assert window[0].sum() == 0 and window[:, 31].sum() == 0
    pred = split_sampling_output(out[0])["pred"][0]
    lesion = vol[0, 0, ..., 1] > 0
    lesion[60:75, 5:20] = False
    assert torch.equal(pred[..., 1].bool(), lesion)  # the lesion found, the far bright square outside the window
    assert pred[..., [0, 2]].sum() == 0  # unprompted slices are background
    with pytest.raises(ValueError, match="region of interest"):
        SlicewiseSamplingInferer(num_samples=2, roi_size=32)(vol, net)


def test_region_of_interest_moves_a_box_prompt_into_the_window(litemedsam):
    image = torch.zeros(1, 1, 160, 160)
    yy, xx = torch.meshgrid(torch.arange(160), torch.arange(160), indexing="ij")
    disk = ((yy - 100) ** 2 + (xx - 110) ** 2) < 15**2
    image[0, 0][disk] = 0.9
    box = torch.tensor([[95.0, 85, 125, 115]])
    out = SlicewiseSamplingInferer(num_samples=2, roi_size=64)(image, BoxPromptedSam(litemedsam), box=box)
    pred = split_sampling_output(out[0])["pred"][0].bool()
    assert 2 * (pred & disk).sum().item() / (pred.sum().item() + disk.sum().item()) > 0.9


class NoiseNetwork(MaskSamplingNetwork):
    """A stochastic stand-in whose samples are its seeded standard normal draws (as the latent methods')."""

    def draw_samples(self, embeddings, conditions, num_samples):
        s = self.backbone.mask_size[0]
        return 10 * conditions.standard_normal(embeddings.shape[0], num_samples, s, s)


def test_case_seeds_make_a_cases_samples_independent_of_the_cases_before_it(litemedsam):
    from ambisam.data import CaseSeedd

    vol, box = _volume()
    other = torch.flip(vol, dims=(2,))  # another case
    net = NoiseNetwork(litemedsam)
    seeds = [CaseSeedd(seed=0)({"id": name})["case_seed"].reshape(1) for name in ("a", "b")]
    inferer = SlicewiseSamplingInferer(num_samples=4, cache=EmbeddingCache(litemedsam))  # 4 slices encoded, once
    torch.manual_seed(0)
    alone = inferer(vol, net, box=box, case_seed=seeds[0])
    torch.manual_seed(0)
    inferer(other, net, box=box, case_seed=seeds[1])  # another case first: the global generator moved on
    after = inferer(vol, net, box=box, case_seed=seeds[0])
    both = inferer(torch.cat([other, vol]), net, box=torch.cat([box, box]), case_seed=torch.cat(seeds[::-1]))
    assert torch.equal(alone, after) and torch.equal(alone[0], both[1])
    torch.manual_seed(0)
    unseeded = inferer(vol, net, box=box)
    assert not torch.equal(unseeded, inferer(vol, net, box=box))  # without case seeds the order matters
    assert not torch.equal(alone, inferer(vol, net, box=box, case_seed=CaseSeedd(seed=1)({"id": "a"})["case_seed"].reshape(1)))
    with pytest.raises(ValueError, match="one case_seed per case"):
        inferer(vol, net, box=box, case_seed=torch.cat(seeds))
