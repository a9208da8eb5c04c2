"""Snapshot ensembles: several trained checkpoints of one method network that share its backbone, drawing the
``N`` samples between them at inference (P2SAM's reference code ensembles its stage-2 checkpoints of epochs 10,
50, 70 and 100, 4 samples each).

The snapshots must have the same backbone weights (P2SAM's stage 2 freezes the whole SAM), so that the image is
encoded once and one embedding serves every snapshot; only the layers outside ``backbone`` differ between them.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence

import torch
from torch import nn

from ambisam.errors import InputError
from ambisam.networks.base import Conditions, MaskSamplingNetwork
from ambisam.sam import check_state_dict_fits, read_state_dict

__all__ = ["SnapshotEnsemble"]

#: the prefix of the backbone's keys in a method network's state dict
BACKBONE_PREFIX = "backbone."
#: member ``k`` draws with seeds offset by ``k`` times this (odd, about 2**62 / golden ratio), modulo 2**62, so
#: that small consecutive seeds (images 0, 1, 2, ...) do not give one image's draws to another image's member
SEED_STRIDE = 0x278DDE6E5FD29E01
SEED_MODULUS = 2**62

_INFERENCE_ONLY = "SnapshotEnsemble is for inference only: train the snapshots' network, then ensemble its checkpoints"


class SnapshotEnsemble(MaskSamplingNetwork):
    """Checkpoints ("snapshots") of one method network, sharing its backbone, as one network.

    Member ``k`` (``members[k]``) is a copy of ``network`` loaded strictly with ``checkpoints[k]``; every member
    uses ``network.backbone`` itself (not a copy), which is this ensemble's ``backbone``. The members' backbone is
    kept out of the module tree: it is registered once, as ``backbone``, so ``state_dict()`` holds the backbone's
    weights once (``backbone.*``) and every member's other weights (``members.<k>.*``), and ``.to()`` /
    ``.train()`` / ``.eval()`` on the ensemble reach the backbone once. (A member moved or switched on its own does
    not move or switch the backbone.)

    :meth:`draw_samples` splits the ``N`` samples between the ``K`` members as evenly as possible
    (:meth:`samples_per_member`: the first ``N % K`` members draw one more) and concatenates them, member by
    member. Member ``k`` draws with its own seeds (:meth:`member_conditions`), so the members do not reuse one
    another's random draws, and images with the same seed still share each member's draws (one 3D hypothesis per
    volume). A member given one sample in eval mode gives its representative prediction, as the method does for
    ``N = 1`` (P2SAM: the mean prompt), so ``forward`` returns the first snapshot's representative prediction;
    choose ``N`` a multiple of ``K`` for random draws from every member.

    An ensemble is for inference only: train the snapshots' network, then ensemble its checkpoints.

    Args:
        network: the method network the checkpoints are of (e.g. a stage-2 :class:`~ambisam.networks.P2Sam`).
            Its backbone becomes the ensemble's and gets the snapshots' backbone weights; the network itself is
            not kept.
        checkpoints: one file per snapshot (or a single path), each a state dict of ``network`` (``strict``),
            bare or under ``key`` (MONAI's ``CheckpointSaver`` writes ``{"model": state_dict, ...}``), loaded with
            ``torch.load(weights_only=True)``.
        key: the key a state dict is nested under in a checkpoint file.

    Attributes:
        members: the ``K`` snapshot networks, in the order of ``checkpoints``.
        checkpoints: the files they were loaded from.
        capabilities: ``network``'s.

    Raises:
        ValueError: no checkpoint.
        InputError: a checkpoint file that is missing, not a state dict, not one of ``network`` (its keys or
            shapes), or whose backbone weights differ from the first checkpoint's.
    """

    def __init__(
        self,
        network: MaskSamplingNetwork,
        checkpoints: Sequence[str | os.PathLike] | str | os.PathLike,
        key: str = "model",
    ) -> None:
        if isinstance(checkpoints, (str, os.PathLike)):
            checkpoints = [checkpoints]
        checkpoints = [str(path) for path in checkpoints]
        if not checkpoints:
            raise ValueError("a snapshot ensemble needs at least one checkpoint")
        super().__init__(network.backbone, freeze_encoder=network.encoder_frozen)
        self.capabilities = network.capabilities
        self.checkpoints = checkpoints
        expected = f"a state dict of {type(network).__name__} (a snapshot)"
        first_backbone: dict[str, torch.Tensor] = {}
        members = []
        for index, path in enumerate(checkpoints):
            state = read_state_dict(path, expected, keys=(key,))
            check_state_dict_fits(network, state, path, expected)
            backbone_state = {k: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
            if index == 0:
                first_backbone = backbone_state
            else:
                _check_same_backbone(backbone_state, first_backbone, path, checkpoints[0])
            member = copy.deepcopy(network, {id(network.backbone): network.backbone})
            member.load_state_dict(state, strict=True)  # the backbone: the first checkpoint's weights again
            del member._modules["backbone"]  # registered once, as the ensemble's; the member still uses it
            member.__dict__["backbone"] = self.backbone
            members.append(member)
        self.members = nn.ModuleList(members)
        self.train(network.training)  # and a backbone loaded in eval mode refreshes what it caches in eval mode

    @property
    def num_members(self) -> int:
        """``K``, the number of snapshots."""
        return len(self.members)

    def samples_per_member(self, num_samples: int) -> list[int]:
        """How many of ``num_samples`` samples each member draws: ``N // K`` each, one more for the first
        ``N % K``.

        Args:
            num_samples: ``N >= 0``.

        Returns:
            ``K`` counts summing to ``N``.
        """
        share, extra = divmod(int(num_samples), self.num_members)
        return [share + (k < extra) for k in range(self.num_members)]

    @staticmethod
    def member_conditions(conditions: Conditions, index: int) -> Conditions:
        """Member ``index``'s conditions: ``conditions`` with the seeds offset by ``index * SEED_STRIDE``, modulo
        ``2**62`` (member 0 keeps the seeds; no seeds stay none).

        Args:
            conditions: the batch's :class:`Conditions`, ``noise_seeds`` ``(B,)`` or ``None``.
            index: the member, ``0 <= index < K``.

        Returns:
            the member's :class:`Conditions`.
        """
        if conditions.noise_seeds is None or index == 0:
            return conditions
        offset = index * SEED_STRIDE % SEED_MODULUS
        return dataclasses.replace(conditions, noise_seeds=(conditions.noise_seeds + offset) % SEED_MODULUS)

    # ------------------------------------------------------------------------------------------------ hooks
    def draw_samples(self, embeddings: torch.Tensor, conditions: Conditions, num_samples: int) -> torch.Tensor:
        """``num_samples`` mask logits per image, member by member (:meth:`samples_per_member`; a member with
        none is not called).

        Args:
            embeddings: ``(B, C, h, w)`` from the shared ``backbone``.
            conditions: the batch's :class:`Conditions` (checked by :meth:`sample_logits`).
            num_samples: ``N >= 1``.

        Returns:
            ``(B, N, h', w')``: member 0's samples, then member 1's, ...
        """
        samples = [
            member.draw_samples(embeddings, self.member_conditions(conditions, index), count)
            for index, (member, count) in enumerate(zip(self.members, self.samples_per_member(num_samples)))
            if count
        ]
        return torch.cat(samples, dim=1)

    def compute_training_outputs(self, embeddings: torch.Tensor, conditions: Conditions, targets: torch.Tensor) -> dict:
        """Not available: an ensemble is for inference only.

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError(_INFERENCE_ONLY)

    def training_outputs(
        self, embeddings: torch.Tensor, conditions: Conditions | torch.Tensor | None, targets: torch.Tensor
    ) -> dict:
        """Not available: an ensemble is for inference only (``capabilities`` are the snapshots' network's).

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError(_INFERENCE_ONLY)


def _check_same_backbone(
    state: dict[str, torch.Tensor], first: dict[str, torch.Tensor], path: str, first_path: str
) -> None:
    """Raise :class:`InputError` naming ``path`` when its backbone weights ``state`` are not ``first``'s."""
    differing = sorted(set(state) ^ set(first))
    differing += sorted(
        k for k in set(state) & set(first)
        if state[k].dtype != first[k].dtype or state[k].shape != first[k].shape or not torch.equal(state[k], first[k])
    )
    if differing:
        raise InputError(
            path,
            f"its backbone weights differ from those of the first snapshot, {first_path} ({len(differing)} "
            f"tensor(s), e.g. {differing[0]}); the snapshots of an ensemble must share one backbone, so that one "
            "image embedding can serve them all",
        )
