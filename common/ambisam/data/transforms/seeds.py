"""A per-case seed, so that a case's samples do not depend on where it falls in a run."""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.transforms import MapTransform

from ambisam.data.ids import case_id

__all__ = ["CaseSeedd", "case_seed"]

#: seeds are kept below 2**62, as the sampling inferer's own draws are
SEED_MODULUS = 2**62


def case_seed(seed: int, case: str) -> int:
    """The seed of one case in a run: a hash of the run's seed and the case's id.

    Args:
        seed: the run's seed (the bundle's ``seed``).
        case: the case's id (:func:`ambisam.data.case_id`).

    Returns:
        An integer in ``[0, 2**62)``, the same for the same ``(seed, case)`` on every machine and in every process.
    """
    digest = hashlib.sha256(f"{int(seed)}:{case}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % SEED_MODULUS


class CaseSeedd(MapTransform):
    """Write ``case_seed``, the seed of the case's random draws, from the run's seed and the case's id.

    The sampling inferer (:class:`~ambisam.inferers.SlicewiseSamplingInferer`, given ``case_seed`` as a batch
    key) seeds each case's N draws from it instead of from torch's global generator, so a case gets the same
    samples whatever came before it: in another order, in a batch of other cases, on another rank of a
    distributed evaluation, or in one request of a server among many.

    Args:
        seed: the run's seed.
        key: the output key.

    Returns:
        (from ``__call__``) the dict with ``case_seed``: a 0-d ``int64`` tensor (batched: ``(B,)``).

    Raises:
        ValueError: the item has no id to derive the seed from (:func:`~ambisam.data.case_id`).
    """

    def __init__(self, seed: int = 0, key: str = "case_seed") -> None:
        super().__init__(key)
        self.seed = int(seed)
        self.key = key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d[self.key] = torch.tensor(case_seed(self.seed, case_id(d)), dtype=torch.int64)
        return d
