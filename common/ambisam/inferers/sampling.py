"""The one sampling inferer every method uses.

For a volume and its per-slice box prompts, :class:`SlicewiseSamplingInferer` encodes each prompted slice once
(through the embedding cache when one is given), asks the method for N samples from that embedding in one
batched call, and stacks everything back into the volume. Slices without a prompt are background, not a model
call.

Output layout, one tensor so that MONAI engines, post-transforms and MONAI Label handle it like any
prediction: ``(B, 3 + N, H, W, D)`` with channels

- 0: ``mean``: the fraction of samples marking each voxel (the mean prediction);
- 1: ``uncertainty``: the binary entropy of the mean, in bits (0 where every sample agrees, 1 at a 50/50 split);
- 2: ``variance``: the variance over samples of each sample's probability (a second, softer map);
- 3 ... 3 + N - 1: the N binary samples, in the order the method drew them.

The final mask is ``mean > threshold`` (:func:`split_sampling_output`).
"""

from __future__ import annotations

import torch
from monai.inferers import Inferer
from monai.utils import optional_import

from ambisam.sam.cache import EmbeddingCache

tqdm, _has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["SlicewiseSamplingInferer", "binary_entropy", "split_sampling_output", "SAMPLING_CHANNELS"]

#: names of the leading channels of the inferer's output
SAMPLING_CHANNELS = ("mean", "uncertainty", "variance")


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of a Bernoulli with probability ``p`` (0 where ``p`` is 0 or 1)."""
    p = p.clamp(0.0, 1.0)
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p)) / torch.log(torch.tensor(2.0, device=p.device))


def split_sampling_output(output: torch.Tensor, threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Split one case's inferer output into named maps.

    Args:
        output: ``(3 + N, *spatial)``.
        threshold: the final mask is ``mean > threshold``.

    Returns:
        ``pred (1, *spatial)`` (the final mask), ``mean``, ``uncertainty``, ``variance`` (each
        ``(1, *spatial)``) and ``samples (N, *spatial)``.
    """
    return {
        "pred": (output[0:1] > threshold).to(output.dtype),
        "mean": output[0:1],
        "uncertainty": output[1:2],
        "variance": output[2:3],
        "samples": output[3:],
    }


class SlicewiseSamplingInferer(Inferer):
    """Sample N masks per prompted slice of a volume (or a 2D image) from one embedding per slice.

    The network is a :class:`~ambisam.networks.MaskSamplingNetwork` (or wraps one as ``.module``, as DDP
    does): it has ``backbone`` and ``sample_logits(embeddings, boxes, num_samples)``.

    Args:
        num_samples: ``N``, the samples drawn per slice.
        threshold: probability above which a sample's pixel is foreground.
        slice_batch_size: slices encoded and sampled per call.
        cache: an :class:`~ambisam.sam.EmbeddingCache` for the (frozen) encoder, or ``None`` to encode
            directly.
        progress: show a progress bar over slices.
    """

    def __init__(
        self,
        num_samples: int = 16,
        threshold: float = 0.5,
        slice_batch_size: int = 4,
        cache: EmbeddingCache | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.threshold = float(threshold)
        self.slice_batch_size = int(slice_batch_size)
        self.cache = cache
        self.progress = progress

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: torch.nn.Module, box: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """Sample a batch of volumes.

        Args:
            inputs: ``(B, 1, H, W, D)`` volumes (or ``(B, 1, H, W)`` images) with intensities in ``[0, 1]``.
            network: the method network.
            box: per-slice boxes ``(B, D, 4)`` (``(B, 4)`` or ``(B, 1, 4)`` for images) in pixels,
                ``[x_min, y_min, x_max, y_max]`` with x along the second spatial axis; a row of ``-1`` marks a
                slice without a prompt. ``None`` for prompt-free methods: every slice is sampled.
            kwargs: ignored (engines may pass extra batch keys).

        Returns:
            ``(B, 3 + N, H, W, D)`` (``(B, 3 + N, H, W)`` for images); see the module docstring.

        Raises:
            ValueError: when a box prompt is needed but missing, or its shape does not match the input.
        """
        net = getattr(network, "module", network)
        is_2d = inputs.ndim == 4
        volumes = inputs[..., None] if is_2d else inputs
        if volumes.ndim != 5:
            raise ValueError(f"expected (B, 1, H, W[, D]) inputs, got {tuple(inputs.shape)}")
        b, _, h, w, d = volumes.shape
        boxes = None
        if box is None:
            if getattr(net, "needs_box", True):
                raise ValueError(f"{type(net).__name__} needs a box prompt per slice, got none")
        else:
            boxes = torch.as_tensor(box, device=volumes.device).float().reshape(b, -1, 4)
            if boxes.shape[1] != d:
                raise ValueError(f"expected {d} per-slice boxes per case, got box of shape {tuple(box.shape)}")

        n = self.num_samples
        out = volumes.new_zeros((b, 3 + n, h, w, d), dtype=torch.float32)
        backbone = net.backbone
        todo = [
            (i, k) for i in range(b) for k in range(d) if boxes is None or bool((boxes[i, k] >= 0).all())
        ]
        batches = [todo[s : s + self.slice_batch_size] for s in range(0, len(todo), self.slice_batch_size)]
        if self.progress and _has_tqdm:
            batches = tqdm(batches, desc="sampling slices", unit="batch")
        for chunk in batches:
            images = torch.stack([volumes[i, :, :, :, k] for i, k in chunk])
            embeddings = self.cache(images) if self.cache is not None else backbone.encode(images)
            prompt = None
            if boxes is not None:
                prompt = backbone.boxes_to_input(torch.stack([boxes[i, k] for i, k in chunk]), (h, w))
            logits = net.sample_logits(embeddings, prompt, n)  # (S, N, s, s)
            probs = torch.sigmoid(backbone.postprocess(logits.float(), (h, w)))  # (S, N, H, W)
            samples = (probs > self.threshold).float()
            mean = samples.mean(dim=1, keepdim=True)
            maps = torch.cat([mean, binary_entropy(mean), probs.var(dim=1, unbiased=False, keepdim=True), samples], 1)
            for j, (i, k) in enumerate(chunk):
                out[i, :, :, :, k] = maps[j]
        return out[..., 0] if is_2d else out
