"""The one method registry: a :class:`MethodSpec` per method, read by the networks package, ``bench``, the
benchmark, the command line, the MONAI Label app and ``export``.

A spec names the method's network class (by dotted path, so reading the registry imports no network), where it
is trained and evaluated (its own bundle, or the *harness* bundle's configs with its network swapped in), its
training stages, and how the benchmark treats it. What the method can do (needs a prompt, trains against one
rater or the set, frozen or trainable encoder, the conditions it reads) is declared by the network class itself
(``capabilities``, see :class:`ambisam.networks.MethodCapabilities`) and read through :attr:`MethodSpec.capabilities`.
A bundle's loss is stated in its ``train.json``; the spec's ``loss`` serves only methods trained through the
harness.
"""

from __future__ import annotations

import pydoc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ambisam.errors import InputError

__all__ = ["MethodSpec", "method_registry", "get_method", "HARNESS_BUNDLE", "DEFAULT_METHODS", "register_method"]

#: the bundle whose configs train and evaluate the methods without a bundle of their own
HARNESS_BUNDLE = "psam"
#: the methods the benchmark (``run_benchmark``, ``ambisam benchmark``) compares when none are named
DEFAULT_METHODS = "psam,p2sam,proseg,baseline,multimask,jitter,mc_dropout,prob_unet"


@dataclass(frozen=True)
class MethodSpec:
    """One method.

    Args:
        name: the registry name (``--methods``, ``--method``).
        description: one line for reports.
        network: dotted path of the network class.
        bundle: the bundle that trains and evaluates it (``None``: the harness bundle, network swapped in).
        stages: the training stages, each a list of the bundle's configs in merge order; ``()`` for a
            training-free method.
        eval_base: the configs ``evaluate.json`` is merged over; default: the last stage's.
        network_args: ``network_def`` arguments besides ``_target_`` (harness methods).
        loss: the loss component config (harness-trained methods; a bundle states its own).
        overrides: further config overrides for this method's training and evaluation (harness methods).
        deterministic: its samples do not depend on the seed.
        multi_organ: it segments the structures of a class-mapped datalist (its own evaluation table); the
            benchmark's multi-rater scoring does not run it (see :func:`ambisam.benchmark.run_benchmark`).
    """

    name: str
    description: str
    network: str
    bundle: str | None = None
    stages: tuple[tuple[str, ...], ...] = (("train",),)
    eval_base: tuple[str, ...] | None = None
    network_args: Mapping[str, Any] = field(default_factory=dict)
    loss: Mapping[str, Any] | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    deterministic: bool = False
    multi_organ: bool = False

    @property
    def network_class(self) -> type:
        """The network class (imported on first use)."""
        cls = pydoc.locate(self.network)
        if not isinstance(cls, type):
            raise InputError(None, f"method '{self.name}': '{self.network}' is not a class")
        return cls

    @property
    def capabilities(self):
        """The network class's declared :class:`~ambisam.networks.MethodCapabilities`."""
        return self.network_class.capabilities

    @property
    def trainable(self) -> bool:
        """Whether the method has training stages."""
        return bool(self.stages)

    @property
    def config_bundle(self) -> str:
        """The bundle whose configs run it (its own, else the harness)."""
        return self.bundle or HARNESS_BUNDLE

    @property
    def eval_configs(self) -> tuple[str, ...]:
        """The configs of its evaluation, ``evaluate`` last."""
        base = self.eval_base if self.eval_base is not None else (self.stages[-1] if self.stages else ("train",))
        return (*base, "evaluate")

    def network_def(self, **args: Any) -> dict:
        """A ``network_def`` config for the harness: ``_target_`` plus ``network_args`` plus ``args``."""
        return {"_target_": self.network, **self.network_args, **args}

    def config_overrides(self) -> dict[str, Any]:
        """The config overrides that make this method out of its config bundle: for a harness method its network
        (:meth:`network_def`) and its loss when given; then ``overrides``; the method's name as ``method``."""
        overrides: dict[str, Any] = {"method": self.name}
        if self.bundle is None:
            overrides["network_def"] = self.network_def()
            if self.loss is not None:
                overrides["loss"] = dict(self.loss)
        overrides.update(self.overrides)
        return overrides

    def build(self, **kwargs: Any):
        """The network, built directly (``bench``, tests): ``network_class(**network_args, **kwargs)`` with the
        harness's ``@`` references dropped."""
        args = {k: v for k, v in self.network_args.items() if not (isinstance(v, str) and v.startswith("@"))}
        return self.network_class(**args, **kwargs)


#: ``network_def`` arguments of a SAM-based harness method: the config's backbone
_ON_BACKBONE = {"backbone": "@backbone", "checkpoint": "@backbone_checkpoint"}

method_registry: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to :data:`method_registry` (a method defined outside the package, e.g. in a test).

    Raises:
        ValueError: the name is taken.
    """
    if spec.name in method_registry:
        raise ValueError(f"a method named '{spec.name}' is already registered")
    method_registry[spec.name] = spec
    return spec


for _spec in (
    MethodSpec("psam", "pSAM: latent code on the box prompt (Ward & Imran 2025)",
               "ambisam.networks.ProbabilisticSam", bundle="psam"),
    MethodSpec("seqsam", "SeqSAM: recurrent set of masks, Hungarian set loss",
               "ambisam.networks.SequentialSam", bundle="seqsam", deterministic=True),
    MethodSpec("mcl", "multiple choice learning on SAM's multimask heads (SeqSAM's baseline)",
               "ambisam.networks.MultipleChoiceSam", bundle="seqsam", stages=(("train", "train_mcl"),),
               deterministic=True),
    MethodSpec("p2sam", "P2SAM: probabilistic prompt generation", "ambisam.networks.P2Sam", bundle="p2sam",
               stages=(("train",), ("train", "train_stage2"))),
    MethodSpec("proseg", "ProSeg: rater-preference and image-ambiguity latents", "ambisam.networks.ProSeg",
               bundle="proseg"),
    MethodSpec("ursam", "UR-SAM: prompt augmentation and uncertainty rectification (training-free)",
               "ambisam.networks.UrSam", bundle="ursam", stages=(), eval_base=("inference",), multi_organ=True),
    MethodSpec("baseline", "deterministic box-prompted SAM (every sample the same)",
               "ambisam.networks.BoxPromptedSam", stages=(), network_args=_ON_BACKBONE, deterministic=True),
    MethodSpec("multimask", "SAM's 3 multimask outputs as 3 hypotheses, tiled to N",
               "ambisam.networks.MultimaskSam", stages=(), network_args=_ON_BACKBONE, deterministic=True),
    MethodSpec("jitter", "prompt-jitter ensemble: N boxes moved by up to 10% of their side",
               "ambisam.networks.PromptJitterSam", stages=(), network_args=_ON_BACKBONE),
    MethodSpec("mc_dropout", "MC dropout (p = 0.1) in the mask decoder's MLPs at sampling",
               "ambisam.networks.McDropoutSam", stages=(), network_args=_ON_BACKBONE),
    MethodSpec(
        "prob_unet",
        "Probabilistic U-Net (Kohl et al. 2018) from scratch, MONAI BasicUNet, box as input channel",
        "ambisam.networks.ProbabilisticUNet",
        # the paper's pixel-summed cross-entropy + beta KL, divided by the pixel count (128 x 128 grid)
        loss={"_target_": "ambisam.losses.LatentSegmentationLoss", "beta": 1.0 / (128 * 128), "bce_weight": 1.0,
              "dice_weight": 0.0},
        overrides={
            "learning_rate": 1e-4,
            "max_epochs": 50,
            # nothing to encode: the image on a 128 x 128 grid is its "embedding"
            "embedding_cache": None,
        },
    ),
):
    register_method(_spec)


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``.

    Raises:
        InputError: unknown name (the message lists the known ones).
    """
    if name not in method_registry:
        raise InputError(None, f"unknown method '{name}'; choose one of {', '.join(method_registry)}")
    return method_registry[name]
