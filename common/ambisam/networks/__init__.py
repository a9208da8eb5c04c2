"""Method networks. Each subclasses :class:`MaskSamplingNetwork`; ``method_registry`` names them for the CLI,
the benchmark and the inferer."""

from ambisam.networks.base import MaskSamplingNetwork
from ambisam.networks.baseline import BoxPromptedSam
from ambisam.networks.latent import AxisAlignedGaussianEncoder, latent_kl_divergence
from ambisam.networks.psam import ProbabilisticSam

#: method name -> network class (built as ``cls(backbone=...)``)
method_registry: dict[str, type[MaskSamplingNetwork]] = {"baseline": BoxPromptedSam, "psam": ProbabilisticSam}

__all__ = [
    "MaskSamplingNetwork",
    "BoxPromptedSam",
    "ProbabilisticSam",
    "AxisAlignedGaussianEncoder",
    "latent_kl_divergence",
    "method_registry",
]
