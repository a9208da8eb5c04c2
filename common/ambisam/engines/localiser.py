"""Training and validating UR-SAM's localiser: the shared trainer with the localiser's hooks, and what a MONAI
``SupervisedEvaluator`` needs to score the relative-distance error on validation volumes.

A batch (:func:`ambisam.data.localiser_training_transforms`) holds ``image (B, 3, P, P, P)``, the three views of
each volume (:data:`~ambisam.data.transforms.localiser.LOCALISER_VIEWS`), ``offset_mm (B, 2, 3)`` and
``points (B, 2, N, 3)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.inferers import Inferer

from ambisam.engines.trainer import MultiRaterTrainer
from ambisam.data.transforms.localiser import DISTANCE_PAIRS
from ambisam.networks.localiser import RELATIVE_RANGE_MM, relative_offset_mm

__all__ = [
    "LocaliserTrainer",
    "RelativeOffsetInferer",
    "localiser_views_forward",
    "prepare_localiser_batch",
    "offset_error_output",
]


def localiser_views_forward(network: torch.nn.Module, views: torch.Tensor) -> dict:
    """The localiser on every view of a batch at once.

    Args:
        network: a :class:`~ambisam.networks.localiser.RelativePositionLocaliser` (or one wrapped by DDP).
        views: ``(B, V, P, P, P)``.

    Returns:
        ``{"position": (B, V, 3), "features": [(B, V, E, s, s, s), ...]}``.
    """
    b, v = views.shape[:2]
    out = network(views.reshape(b * v, 1, *views.shape[2:]))
    return {
        "position": out["position"].reshape(b, v, -1),
        "features": [f.reshape(b, v, *f.shape[1:]) for f in out["features"]],
    }


class LocaliserTrainer(MultiRaterTrainer):
    """:class:`~ambisam.engines.MultiRaterTrainer` (its per-epoch seeding, so a resumed run repeats the
    interrupted one, and its step) with the localiser's hooks: the views through the network, the offsets and
    points as the target, :class:`~ambisam.losses.LocaliserLoss` as the loss.

    Args: as :class:`~ambisam.engines.MultiRaterTrainer` (no embedding cache, no slice batches).
    """

    prediction_key = "position"

    def target(self, batch: Mapping) -> dict:
        """The crop pairs' offsets and the point correspondences."""
        return {"offset_mm": batch["offset_mm"], "points": batch["points"]}

    def training_outputs(self, batch: Mapping, embedding_cache: Any = None) -> dict:
        """:func:`localiser_views_forward` of the batch's views."""
        return localiser_views_forward(self.network, batch["image"])

    def compute_loss(self, outputs: dict, batch: Mapping) -> torch.Tensor:
        """The localiser loss of the step."""
        return self.loss_function(outputs, self.target(batch))


def prepare_localiser_batch(batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs: Any) -> tuple:
    """``prepare_batch`` of the validation evaluator: ``(views, offset_mm)`` on ``device``.

    Args:
        batchdata: a collated batch.
        device: the target device.
        non_blocking: as ``Tensor.to``.
        kwargs: further arguments of ``Tensor.to``.

    Returns:
        ``image (B, 3, P, P, P)`` and ``offset_mm (B, 2, 3)``.
    """
    return tuple(torch.as_tensor(batchdata[k]).to(device, non_blocking=non_blocking, **kwargs)
                 for k in ("image", "offset_mm"))


class RelativeOffsetInferer(Inferer):
    """The predicted offsets of each volume's validation pairs, ``r * tanh(p_a - p_b)`` for
    :data:`~ambisam.data.transforms.localiser.DISTANCE_PAIRS`.

    Args:
        range_mm: ``r`` along ``(i, j, k)``.
    """

    def __init__(self, range_mm=RELATIVE_RANGE_MM) -> None:
        super().__init__()
        self.range_mm = tuple(float(v) for v in range_mm)

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Args: ``inputs (B, 3, P, P, P)``, the views; ``network``, the localiser.

        Returns:
            ``(B, 2, 3)`` offsets in mm.
        """
        position = localiser_views_forward(network, inputs)["position"]
        return torch.stack([relative_offset_mm(position[:, a], position[:, b], self.range_mm)
                            for a, b in DISTANCE_PAIRS], dim=1)


def offset_error_output(output: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """``output_transform`` of ignite's ``MeanPairwiseDistance`` on the (not decollated) evaluator output: the
    predicted and true offsets as ``(B * 2, 3)`` rows, so that the metric is the mean Euclidean error in mm."""
    return output["pred"].reshape(-1, 3), output["label"].reshape(-1, 3)
