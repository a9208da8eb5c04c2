"""Method networks. Each subclasses :class:`MaskSamplingNetwork`; ``method_registry`` names them for the CLI,
the benchmark and the inferer."""

from ambisam.networks.base import MaskSamplingNetwork
from ambisam.networks.baseline import BoxPromptedSam
from ambisam.networks.baselines import McDropoutSam, MultimaskSam, PromptJitterSam
from ambisam.networks.latent import AxisAlignedGaussianEncoder, latent_kl_divergence
from ambisam.networks.mcl import MultipleChoiceSam
from ambisam.networks.prob_unet import ImageGridBackbone, ProbabilisticUNet
from ambisam.networks.psam import ProbabilisticSam
from ambisam.networks.seqsam import FoldedPromptCell, RecurrentPromptCell, SequentialSam

#: method name -> network class (built as ``cls(backbone=...)``)
method_registry: dict[str, type[MaskSamplingNetwork]] = {
    "baseline": BoxPromptedSam,
    "psam": ProbabilisticSam,
    "seqsam": SequentialSam,
    "mcl": MultipleChoiceSam,
    "multimask": MultimaskSam,
    "jitter": PromptJitterSam,
    "mc_dropout": McDropoutSam,
}

__all__ = [
    "MaskSamplingNetwork",
    "BoxPromptedSam",
    "ProbabilisticSam",
    "SequentialSam",
    "RecurrentPromptCell",
    "FoldedPromptCell",
    "MultipleChoiceSam",
    "MultimaskSam",
    "PromptJitterSam",
    "McDropoutSam",
    "ProbabilisticUNet",
    "ImageGridBackbone",
    "AxisAlignedGaussianEncoder",
    "latent_kl_divergence",
    "method_registry",
]
