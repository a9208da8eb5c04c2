"""UR-SAM's localiser: a small 3D CNN that maps a CT patch to a latent position and to multi-scale point
embeddings (MedLAM-style relative-distance regression, then local feature matching).

**Input.** A ``(B, 1, 64, 64, 64)`` patch of a volume on the localiser's grid
(:data:`ambisam.data.transforms.localiser.LOCALISER_SPACING_MM` = 3 mm isotropic voxels, axes RAS after
:func:`ambisam.data.localiser_volume_transforms`), intensities mapped piecewise-linearly by
:func:`ambisam.data.piecewise_linear_intensity` (``[-1000, -200, 200, 1500]`` HU to ``[0, 0.2, 0.8, 1]``).

**Axes.** The package indexes arrays ``a[c, i, j, k]``; on the localiser's grid ``i`` runs towards the patient's
Right (world x), ``j`` towards Anterior (world y), ``k`` towards Superior (world z, the slices). METHODS.md states
the relative range ``r = [1500, 600, 600]`` mm in ``(z, y, x)`` order (:data:`RELATIVE_RANGE_MM_ZYX`); in the
package's ``(i, j, k) = (x, y, z)`` order that is :data:`RELATIVE_RANGE_MM` ``= (600, 600, 1500)``: the latent
position's component ``n`` and every offset in mm are along axis ``n`` of ``(i, j, k)``.

**Outputs** (:meth:`RelativePositionLocaliser.forward`): ``position (B, 3)``, a latent vector such that
``r * tanh(position_a - position_b)`` is the offset in mm from patch ``b``'s centre to patch ``a``'s
(:class:`ambisam.losses.RelativeDistanceLoss`), and ``features``, three L2-normalised point-embedding maps at
1/2, 1/4 and 1/8 of the patch's resolution, which :func:`point_features` samples at given points.

**Size** (``channels=(8, 16, 32, 64)``, ``embedding_dim=16``): 554,683 parameters (2.2 MB of float32 weights) and
0.224 GFLOP per 64^3 patch, forward only, as ``torch.utils.flop_counter.FlopCounterMode`` counts it (a
multiply-add is 2 FLOP; PyTorch 2.14). On one thread of the project's 2-core CPU machine a forward pass takes about
0.05 s per patch, a training step of two volumes (six patches, forward and backward) about 0.4 s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from ambisam.data.transforms.localiser import PATCH_SIZE

__all__ = [
    "RELATIVE_RANGE_MM",
    "RELATIVE_RANGE_MM_ZYX",
    "RelativePositionLocaliser",
    "point_features",
    "relative_offset_mm",
]

#: the relative range ``r`` in mm as METHODS.md states it, ``(z, y, x)``
RELATIVE_RANGE_MM_ZYX = (1500.0, 600.0, 600.0)
#: the same ``r`` in the package's ``(i, j, k) = (x, y, z)`` axis order of the localiser's RAS grid
RELATIVE_RANGE_MM = tuple(reversed(RELATIVE_RANGE_MM_ZYX))

_NORM = ("instance", {"affine": True})


def relative_offset_mm(position_a: torch.Tensor, position_b: torch.Tensor,
                       range_mm: Sequence[float] = RELATIVE_RANGE_MM) -> torch.Tensor:
    """The offset in mm from the centre of patch ``b`` to the centre of patch ``a``: ``r * tanh(p_a - p_b)``.

    Args:
        position_a: ``(..., 3)`` latent positions.
        position_b: ``(..., 3)`` latent positions (broadcast against ``position_a``).
        range_mm: ``r`` along ``(i, j, k)``.

    Returns:
        ``(..., 3)`` offsets in mm along ``(i, j, k)``.
    """
    r = torch.as_tensor(range_mm, dtype=position_a.dtype, device=position_a.device)
    return r * torch.tanh(position_a - position_b)


def point_features(features: Sequence[torch.Tensor], points: torch.Tensor,
                   patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """The multi-scale embedding of points of a patch: each scale sampled trilinearly, L2-normalised, the scales
    concatenated and divided by ``sqrt(num_scales)`` (so the result has unit norm and a dot product of two is the
    mean of the scales' cosine similarities).

    Args:
        features: the network's feature maps, each ``(B, E, s, s, s)`` covering the same ``patch_size^3`` patch.
        points: ``(B, P, 3)`` voxel coordinates ``(i, j, k)`` in the patch (voxel centres are whole numbers
            ``0 .. patch_size - 1``; fractions interpolate).

    Returns:
        ``(B, P, num_scales * E)`` unit vectors.
    """
    # grid_sample's grid is (x, y, z) = (k, j, i) for a (B, C, I, J, K) input, in [-1, 1] over the patch's extent
    grid = ((2.0 * points + 1.0) / patch_size - 1.0).flip(-1)[:, :, None, None, :].to(features[0].dtype)
    sampled = [
        F.normalize(F.grid_sample(f, grid, mode="bilinear", padding_mode="border", align_corners=False)
                    .flatten(2).transpose(1, 2), dim=-1)
        for f in features
    ]
    return torch.cat(sampled, dim=-1) / math.sqrt(len(sampled))


class RelativePositionLocaliser(nn.Module):
    """A 3D CNN: a CT patch to its latent position and its multi-scale point-embedding maps.

    Layers (MONAI blocks, instance norm with affine parameters, PReLU): a stride-2 ``Convolution`` stem
    (``channels[0]`` maps at 32^3), then three stride-2 ``ResidualUnit`` s (``channels[1:]`` at 16^3, 8^3, 4^3).
    The position head flattens the last maps (their layout says where the patch is) into a two-layer MLP whose last
    layer starts at zero (an untrained network predicts no offset). The
    point embeddings are ``1 x 1 x 1`` convolutions of the stem's and the first two units' outputs, each
    L2-normalised over its channels.

    Args:
        channels: the four stages' channels.
        embedding_dim: channels of each point-embedding map.
        hidden: width of the position head's hidden layer.
        patch_size: the input's side (a multiple of 16).

    Raises:
        ValueError: ``channels`` not four values, or ``patch_size`` not a multiple of 16.
    """

    def __init__(self, channels: Sequence[int] = (8, 16, 32, 64), embedding_dim: int = 16, hidden: int = 64,
                 patch_size: int = PATCH_SIZE) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 4:
            raise ValueError(f"channels must be four values, got {channels}")
        if patch_size % 16:
            raise ValueError(f"patch_size must be a multiple of 16, got {patch_size}")
        self.patch_size = int(patch_size)
        self.stem = Convolution(3, 1, channels[0], strides=2, kernel_size=3, norm=_NORM)
        self.stages = nn.ModuleList(
            ResidualUnit(3, c_in, c_out, strides=2, kernel_size=3, subunits=2, norm=_NORM)
            for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.embeddings = nn.ModuleList(nn.Conv3d(c, embedding_dim, kernel_size=1) for c in channels[:3])
        side = self.patch_size // 16
        self.position_head = nn.Sequential(
            nn.Flatten(), nn.Linear(channels[3] * side**3, hidden), nn.PReLU(), nn.Linear(hidden, 3)
        )
        # an untrained network predicts no offset (p_a - p_b = 0) rather than tanh-saturated ones of r
        nn.init.zeros_(self.position_head[-1].weight)
        nn.init.zeros_(self.position_head[-1].bias)

    def forward(self, patches: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Encode patches.

        Args:
            patches: ``(B, 1, P, P, P)``, ``P = patch_size``.

        Returns:
            ``{"position": (B, 3), "features": [(B, E, P/2, P/2, P/2), (B, E, P/4, ...), (B, E, P/8, ...)]}``.

        Raises:
            ValueError: a patch of another shape.
        """
        if patches.ndim != 5 or patches.shape[1] != 1 or tuple(patches.shape[2:]) != (self.patch_size,) * 3:
            raise ValueError(f"expected patches (B, 1, {self.patch_size}, {self.patch_size}, {self.patch_size}), "
                             f"got {tuple(patches.shape)}")
        maps = [self.stem(patches)]
        for stage in self.stages:
            maps.append(stage(maps[-1]))
        features = [F.normalize(head(m), dim=1) for head, m in zip(self.embeddings, maps[:3])]
        return {"position": self.position_head(maps[-1]), "features": features}
