"""Method networks: the method contract (:mod:`~ambisam.networks.base`) and one module per method. The methods are
named, with their bundles and stages, in the one registry, :mod:`ambisam.registry` (re-exported here as
``method_registry``)."""

from ambisam.networks.base import Conditions, MaskSamplingNetwork, MethodCapabilities
from ambisam.networks.baseline import BoxPromptedSam
from ambisam.networks.baselines import McDropoutSam, MultimaskSam, PromptJitterSam
from ambisam.networks.ensemble import SnapshotEnsemble
from ambisam.networks.latent import AxisAlignedGaussianEncoder, latent_kl_divergence
from ambisam.networks.mcl import MultipleChoiceSam
from ambisam.networks.p2sam import DensePromptMapping, DiversityAwareAssembling, P2Sam, PromptGenerationNetwork
from ambisam.networks.prob_unet import ImageGridBackbone, ProbabilisticUNet
from ambisam.networks.proseg import ProSeg, check_rater_table, rater_index, trained_raters
from ambisam.networks.psam import ProbabilisticSam
from ambisam.networks.seqsam import FoldedPromptCell, RecurrentPromptCell, SequentialSam
from ambisam.networks.ursam import UrSam
from ambisam.registry import get_method, method_registry

__all__ = [
    "MaskSamplingNetwork",
    "MethodCapabilities",
    "Conditions",
    "get_method",
    "BoxPromptedSam",
    "ProbabilisticSam",
    "SequentialSam",
    "RecurrentPromptCell",
    "FoldedPromptCell",
    "MultipleChoiceSam",
    "P2Sam",
    "ProSeg",
    "UrSam",
    "trained_raters",
    "rater_index",
    "check_rater_table",
    "DiversityAwareAssembling",
    "PromptGenerationNetwork",
    "DensePromptMapping",
    "MultimaskSam",
    "PromptJitterSam",
    "McDropoutSam",
    "SnapshotEnsemble",
    "ProbabilisticUNet",
    "ImageGridBackbone",
    "AxisAlignedGaussianEncoder",
    "latent_kl_divergence",
    "method_registry",
]
