"""Which evaluation output a metric reads: the samples' probability maps where the inferer kept them, else the
binary samples."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from monai.handlers import from_engine

__all__ = ["MetricInputs"]

logger = logging.getLogger(__name__)


class MetricInputs:
    """An ``output_transform`` giving a metric ``(y_pred, y)`` from the (decollated) evaluation output.

    ``y_pred`` is each item's ``key`` (default the inferer's ``probabilities``, see
    :mod:`ambisam.inferers.layout`) where every item holds it, else its ``fallback`` (the binary ``samples``),
    with one logged line (once per instance) saying that the metric is then computed on the fallback.

    Args:
        key: the output the metric should read.
        fallback: the output read where ``key`` is absent; ``None`` makes its absence a ``KeyError``.
        label_key: the rater masks ``(K, *spatial)``.

    Returns:
        (from ``__call__``) ``(y_pred, y)``: lists of ``(N, *spatial)`` and ``(K, *spatial)`` tensors.

    Raises:
        KeyError: (from ``__call__``) neither ``key`` nor ``fallback`` is in the output.
    """

    def __init__(self, key: str = "probabilities", fallback: str | None = "samples", label_key: str = "label") -> None:
        self.key = key
        self.fallback = fallback
        self.label_key = label_key
        self._warned = False

    def __call__(self, output: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> Any:
        items = output if isinstance(output, Sequence) else [output]
        key = self.key
        if self.fallback is not None and not all(self.key in item for item in items):
            if not self._warned:
                logger.warning(
                    "the evaluation output has no '%s' (set keep_probabilities: true in the evaluation): this metric "
                    "is computed on '%s' instead", self.key, self.fallback)
                self._warned = True
            key = self.fallback
        return from_engine([key, self.label_key])(output)
