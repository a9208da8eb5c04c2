"""Method networks. Each subclasses :class:`MaskSamplingNetwork`; ``method_registry`` names them for the CLI,
the benchmark and the inferer."""

from ambisam.networks.base import MaskSamplingNetwork
from ambisam.networks.baseline import BoxPromptedSam

#: method name -> network class (built as ``cls(backbone=...)``)
method_registry: dict[str, type[MaskSamplingNetwork]] = {"baseline": BoxPromptedSam}

__all__ = ["MaskSamplingNetwork", "BoxPromptedSam", "method_registry"]
