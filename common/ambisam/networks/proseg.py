"""ProSeg (seed paper; reference code AI4MOL/ProSeg, a fork of D-Persona): segmentation from two latent
variables, a per-rater **rater-preference** latent ``z_r`` (a Dirichlet) and a per-pixel **image-ambiguity**
latent ``z_x`` (a Gaussian from a rater-specific statistic head), decoded together by a small 1x1 head.

- :func:`flat_dirichlet_from_normal`: ``Dir(1)`` draws made from standard normal draws (so the inferer's seeded
  draws fix them);
- :func:`gaussian_kl_to_prior`: the per-pixel Gaussian KL to ``N(0, prior variance)``;
- :class:`ProSeg`: the method network, on a SAM backbone (box-prompted mask decoder features) or on a
  randomly initialised U-Net (the paper's setting).

Its loss is :class:`~ambisam.losses.ProSegLoss`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet
from torch import nn
from torch.distributions import Dirichlet, Normal

from ambisam.data.conventions import datalist_raters
from ambisam.errors import InputError
from ambisam.networks.base import Conditions, MaskSamplingNetwork, MethodCapabilities
from ambisam.networks.latent import latent_kl_divergence
from ambisam.networks.prob_unet import ImageGridBackbone, box_masks
from ambisam.sam import DEFAULT_BACKBONE, SamBackbone
from ambisam.weights import load_weights

__all__ = [
    "ProSeg",
    "flat_dirichlet_from_normal",
    "gaussian_kl_to_prior",
    "trained_raters",
    "rater_index",
    "check_rater_table",
]

logger = logging.getLogger(__name__)

#: the inference modes (``conditions.mode``; ``None`` is the first)
MODES = ("diverse", "personalised")
#: how the rater id of a training image is defined
RATER_IDENTITIES = ("named", "ranked_by_area", "anonymous")


def flat_dirichlet_from_normal(normal_draws: torch.Tensor) -> torch.Tensor:
    """Draws of the flat Dirichlet ``Dir(1, ..., 1)`` made from standard normal draws, one per dimension.

    ``Dir(1)`` is a vector of independent ``Exp(1)`` variables divided by its sum, and ``Exp(1) = -log(U)`` for
    ``U`` uniform on ``(0, 1)``; ``U = Phi(g)`` (the standard normal CDF, ``torch.special.ndtr``) of a standard
    normal ``g`` is uniform. ``U`` is clamped away from 0 and 1 so that no ``Exp(1)`` value is infinite or zero.
    No global random state is used: the draws are a function of ``normal_draws``.

    Args:
        normal_draws: ``(..., D)`` standard normal draws, ``D >= 2``.

    Returns:
        ``(..., D)`` points of the probability simplex (non-negative, summing to 1 over the last dimension).
    """
    finfo = torch.finfo(normal_draws.dtype)
    uniform = torch.special.ndtr(normal_draws).clamp(finfo.tiny, 1.0 - finfo.eps)
    exponential = -torch.log(uniform)
    return exponential / exponential.sum(dim=-1, keepdim=True)


def gaussian_kl_to_prior(mu: torch.Tensor, log_variance: torch.Tensor, prior_log_variance: float) -> torch.Tensor:
    """``KL(N(mu, sigma^2) || N(0, v))`` of a per-pixel diagonal Gaussian, summed over the channels and averaged
    over the pixels.

    Per channel and pixel the divergence is ``(log v - log sigma^2 + (sigma^2 + mu^2) / v - 1) / 2``: zero where
    ``mu = 0`` and ``log sigma^2 = log v``.

    Args:
        mu: ``(B, C, h, w)`` means.
        log_variance: ``(B, C, h, w)`` log-variances ``log sigma^2``.
        prior_log_variance: ``log v`` of the prior.

    Returns:
        ``(B,)``.
    """
    prior_variance = math.exp(prior_log_variance)
    per_value = 0.5 * (prior_log_variance - log_variance + (log_variance.exp() + mu.square()) / prior_variance - 1.0)
    return per_value.sum(dim=1).flatten(1).mean(dim=1)


def _check_rater_names(names: Sequence[str] | None, num_raters: int) -> tuple[str, ...]:
    """``names`` as a tuple of ``num_raters`` distinct strings (positional ``"0"`` to ``"K-1"`` for ``None``)."""
    if names is None:
        return tuple(str(r) for r in range(num_raters))
    names = tuple(str(n) for n in names)
    if len(names) != num_raters or len(set(names)) != len(names):
        raise ValueError(f"rater_names must name each of the {num_raters} raters once, got {list(names)}")
    return names


def trained_raters(ckpt_path: str | os.PathLike) -> dict | None:
    """The raters a saved ProSeg model was trained with, read from its weights file without building it.

    Args:
        ckpt_path: a ``model.pt`` (a state dict, or a dict holding one under ``"model"``).

    Returns:
        ``{"rater_names": [...], "rater_identity": ...}``, or ``None`` when the file is absent or holds none.
    """
    if not os.path.isfile(ckpt_path):
        return None
    state = load_weights(ckpt_path, "ProSeg weights")
    state = state.get("model", state) if isinstance(state, dict) else {}
    extra = state.get("_extra_state") if isinstance(state, dict) else None
    return dict(extra) if isinstance(extra, dict) and "rater_names" in extra else None


def rater_index(rater_names: Sequence[str], rater: str | int | None) -> int | None:
    """The id of ``rater`` (a name in ``rater_names``, or an id), ``None`` for ``None``.

    Raises:
        InputError: an unknown name or an id out of range (listing the trained raters).
    """
    if rater is None:
        return None
    names = [str(n) for n in rater_names]
    if str(rater) in names:
        return names.index(str(rater))
    if isinstance(rater, int) or str(rater).isdigit():
        if 0 <= int(rater) < len(names):
            return int(rater)
    raise InputError(None, f"unknown rater {rater!r}: the model was trained with the raters {names} (give a name "
                           f"or an id from 0 to {len(names) - 1})")


def check_rater_table(
    datalist: str | os.PathLike, ckpt_path: str | os.PathLike, rater_order: str = "datalist"
) -> list[str]:
    """Check that a datalist's raters are the ones a saved model was trained with (evaluation: rater r of the
    data must be rater r of the model).

    Args:
        datalist: the datalist JSON file.
        ckpt_path: the model's weights.
        rater_order: ``"area"`` when rater ids are ranks by area (any names then fit; the count must).

    Returns:
        The datalist's rater names (checked), so a config can take them from this call.

    Raises:
        InputError: naming the datalist, when its rater table differs from the trained one.
    """
    names = list(datalist_raters(datalist))
    trained = trained_raters(ckpt_path)
    if trained is None or trained.get("rater_identity") == "anonymous":
        return names
    expected = list(trained["rater_names"])
    if rater_order == "area" or trained.get("rater_identity") == "ranked_by_area":
        if len(names) != len(expected):
            raise InputError(datalist, f"has {len(names)} raters; the model ranks {len(expected)} by area")
        return names
    if names != expected:
        raise InputError(datalist, f"names the raters {names}, but the model {ckpt_path} was trained with "
                                   f"{expected}: rater ids would not match (give the trained rater table)")
    return names


def _rater_conv(heads: nn.ModuleList, rater_ids: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Apply rater ``rater_ids[b, r]``'s 1x1 convolution (one ``nn.Conv2d`` per rater in ``heads``) to the
    inputs of image ``b``, for every ``r`` at once (no head runs on an image it does not serve).

    Args:
        heads: ``K`` 1x1 ``nn.Conv2d`` with one shape, ``C -> O`` channels.
        rater_ids: ``(B, R)`` integer rater ids in ``[0, K)``.
        inputs: ``(B, C, h, w)`` (every ``r`` reads the same input) or ``(B, R, C, h, w)``.

    Returns:
        ``(B, R, O, h, w)``.
    """
    weights = torch.stack([head.weight[:, :, 0, 0] for head in heads])[rater_ids]  # (B, R, O, C)
    biases = torch.stack([head.bias for head in heads])[rater_ids]  # (B, R, O)
    if inputs.ndim == 4:
        out = torch.einsum("broc,bchw->brohw", weights, inputs)
    else:
        out = torch.einsum("broc,brchw->brohw", weights, inputs)
    return out + biases[..., None, None]


class ProSeg(MaskSamplingNetwork):
    """ProSeg: a rater-preference latent ``z_r`` and an image-ambiguity latent ``z_x`` decoded into one mask.

    - ``rater_alphas`` ``(K, D)``: rater ``r``'s posterior ``Dir(softplus(alpha_r))`` over ``z_r`` (``D = 8``),
      initialised to 1.0 at dimensions ``r`` and ``r + D / 2`` (mod ``D``) and 0.1 elsewhere; prior ``Dir(1)``;
    - ``statistic_heads``: one 1x1 convolution per rater from the pixel features to the mean and log-variance
      of ``z_x`` at every pixel (``Dz = 16`` channels each);
    - ``mask_head``: ``z_r`` tiled over the grid and concatenated with ``z_x`` (``D + Dz = 24`` channels), 1x1
      convolutions ``24 -> 16 -> 16 -> 1`` with ReLU between: the mask logit;
    - ``rater_classifier``: a linear layer predicting the rater id from ``z_r`` (cross-entropy, one softmax:
      the reference code applies softmax twice, which is not copied);
    - ``reconstruction_heads``: one 1x1 convolution per rater from the 24 latent channels to one channel, which
      reconstructs the image (resized to the logit grid) from the latents (MSE).

    The loss (:class:`~ambisam.losses.ProSegLoss`): generalised Dice + CE(rater) + reconstruction MSE +
    ``0.1 * (KL_dir + KL_gauss)``; the reference's small L2 is the optimizer's ``weight_decay``. Rater latents
    and classifier train at their own learning rate (:meth:`parameter_groups`).

    **Pixel features on the SAM backbone (our choice; the paper uses a U-Net).** The box-prompted SAM mask
    decoder (trainable; the image encoder is frozen) runs once per image and gives the features the statistic
    heads read: the decoder's upscaled image embedding (the output of ``mask_decoder.output_upscaling``,
    ``transformer_dim / 8 = 32`` channels on the ``4h x 4w`` logit grid, 256 x 256 for LiteMedSAM) and SAM's own
    single-mask logit for the box as a 33rd channel. All ``N`` samples of an image are decoded from these
    features by the 1x1 heads in one batch ("encode once, sample many"). With ``backbone="unet"`` (the paper's
    setting) a randomly initialised MONAI :class:`~monai.networks.nets.BasicUNet` on an
    :class:`~ambisam.networks.prob_unet.ImageGridBackbone` grid reads the image and the box as a mask (as
    :class:`~ambisam.networks.prob_unet.ProbabilisticUNet` with ``use_box=True``), and its ``unet_features[-1]``
    output channels are the features.

    **Initialisation on the SAM backbone (``sam_init``, the default; the architecture is the reference's).** The
    reference trains its heads from random weights for 100 epochs. Here the heads start so that an untrained model
    decodes SAM's own mask through the image latent: each statistic head's mean of ``z_x``'s first channel reads
    SAM's logit (weight 0.1), every log-variance starts at ``log 0.03^2`` (sigma 0.03), and the ``mask_head`` passes
    that channel through (two ReLU units for its positive and negative parts, then their difference, times 10); every other weight
    starts near zero (SD 1e-3). So an untrained model is box-prompted SAM, the mask is still decoded from the
    latents alone (a first try added SAM's logit to the head's output instead: the data then bypassed the latents,
    which collapsed, and every rater got the same mask), and a rater's head moves its rater's mask from the first
    step (a bias on that mean is a boundary shift). ``sam_init=False`` keeps PyTorch's random initialisation.

    Inference modes (``conditions.mode``):

    - ``"diverse"`` (the default, ``None``): sample ``i`` draws ``z_r`` from the prior ``Dir(1)`` and ``z_x`` from
      the statistic head of rater ``i mod K`` (the samples go round-robin over the raters' heads);
    - ``"personalised"``: sample ``i`` is rater ``i mod K``'s prediction decoded from that rater's posterior
      **means** (``z_r`` the mean of ``Dir(softplus(alpha_r))``, ``z_x = mu_r``): deterministic. **Departure from
      the reference code**, which decodes one posterior sample.

    With ``conditions.rater_ids`` every sample of image ``b`` is rater ``rater_ids[b]``'s (personalised: ``N``
    times the same prediction; diverse: ``z_r`` from the prior, ``z_x`` drawn from that rater's head). In eval mode
    with ``N = 1`` and no mode the one sample is deterministic, so ``forward`` is: the mean probability of the
    ``K`` personalised predictions (that rater's with ``rater_ids``), as a logit. All inference noise comes from
    ``conditions.standard_normal`` (seeded per volume by the inferer): one draw of ``D + Dz * h * w`` values per
    sample, the first ``D`` make ``z_r`` (:func:`flat_dirichlet_from_normal`), the rest ``z_x``'s noise (one draw,
    not one per latent: two draws from one seed would start from the same numbers). Training reparameterises both
    (``rsample``). The image (the reconstruction target) and the rater id are read in training; at sampling both
    are optional.

    Rater identity (``rater_identity``): ``"named"``, the datalist's rater index; ``"ranked_by_area"``, the rank
    of the rater's mask by area (the data pipeline ranks; the network treats it like ``"named"``);
    ``"anonymous"``, one rater latent and one head (``K = 1``), rater ids ignored (the CE term is then 0), only
    the diverse mode.

    Args:
        backbone: a built :class:`~ambisam.sam.SamBackbone`, a registry name, or ``"unet"``.
        checkpoint: backbone weights for a registry name that needs them (not with ``"unet"``).
        num_raters: ``K`` (ignored with ``"anonymous"``, which has one).
        rater_identity: one of ``"named"``, ``"ranked_by_area"``, ``"anonymous"``.
        rater_latent_dim: ``D``, dimension of ``z_r`` (at least 2).
        image_latent_dim: ``Dz``, channels of ``z_x``.
        head_channels: channels of the ``mask_head``'s hidden 1x1 convolutions.
        prior_log_variance: log-variance of the Gaussian prior of ``z_x``. The default 0.0 is the standard normal
            prior; the reference code uses 1.0, i.e. a prior variance of ``e`` (a quirk, not the default here).
        image_size: the grid side of the ``"unet"`` option.
        unet_features: :class:`~monai.networks.nets.BasicUNet` features of the ``"unet"`` option (six values; the
            last is the feature map's channels).
        sam_init: on a SAM backbone, initialise the heads so that an untrained model decodes SAM's logit through
            the image latent (see the class docstring); ignored with ``"unet"``.
        rater_names: the name of each rater id (the training datalist's rater table; default ``"0"`` to
            ``"K-1"``). Saved with the weights (``get_extra_state``), so a loaded model knows whose predictions it
            makes: loading replaces the names given here by the trained ones.

    Attributes:
        inference_modes: the modes ``conditions.mode`` takes (``"diverse"``, the default, and ``"personalised"``).

    Raises:
        ValueError: on an unknown ``rater_identity``, a non-positive size, ``rater_latent_dim < 2``, a
            non-finite ``prior_log_variance``, or a checkpoint or malformed features for ``"unet"``.
    """

    capabilities = MethodCapabilities(training_target="rater", conditions=("image", "rater_id", "mode"))
    inference_modes = MODES

    def __init__(
        self,
        backbone: SamBackbone | str = DEFAULT_BACKBONE,
        checkpoint: str | os.PathLike | None = None,
        num_raters: int = 4,
        rater_identity: str = "named",
        rater_latent_dim: int = 8,
        image_latent_dim: int = 16,
        head_channels: int = 16,
        prior_log_variance: float = 0.0,
        image_size: int = 128,
        unet_features: Sequence[int] = (32, 32, 64, 128, 192, 32),
        rater_names: Sequence[str] | None = None,
        sam_init: bool = True,
    ) -> None:
        if rater_identity not in RATER_IDENTITIES:
            raise ValueError(f"rater_identity must be one of {RATER_IDENTITIES}, got {rater_identity!r}")
        sizes = {"num_raters": num_raters, "image_latent_dim": image_latent_dim, "head_channels": head_channels}
        if any(int(v) < 1 for v in sizes.values()):
            raise ValueError(f"sizes must be positive, got {sizes}")
        if int(rater_latent_dim) < 2:
            raise ValueError(f"rater_latent_dim must be at least 2 (a Dirichlet over 1 value is constant), "
                             f"got {rater_latent_dim}")
        if not math.isfinite(float(prior_log_variance)):
            raise ValueError(f"prior_log_variance must be finite, got {prior_log_variance}")
        unet = isinstance(backbone, str) and backbone == "unet"
        if unet:
            if checkpoint is not None:
                raise ValueError("the unet option is randomly initialised: it takes no checkpoint")
            if len(unet_features) != 6 or any(int(f) < 1 for f in unet_features):
                raise ValueError(f"unet_features must be six positive ints, got {tuple(unet_features)}")
            backbone = ImageGridBackbone(image_size)
        super().__init__(backbone, checkpoint)

        self.rater_identity = rater_identity
        self.num_raters = 1 if rater_identity == "anonymous" else int(num_raters)
        self.rater_latent_dim = int(rater_latent_dim)
        self.image_latent_dim = int(image_latent_dim)
        self.prior_log_variance = float(prior_log_variance)
        if rater_identity == "anonymous":
            rater_names = ("anonymous",)
        self.rater_names = _check_rater_names(rater_names, self.num_raters)
        if rater_identity == "anonymous":
            self.capabilities = self.capabilities._replace(conditions=("image", "mode"))
            logger.info("ProSeg(rater_identity='anonymous'): one rater latent and one statistic head; it trains "
                        "in diverse-only mode (no personalised predictions)")

        if unet:
            feature_channels = int(unet_features[-1])
            self.unet = BasicUNet(spatial_dims=2, in_channels=2, out_channels=feature_channels,
                                  features=tuple(int(f) for f in unet_features))
        else:
            self.unet = None
            # the upscaled embedding has transformer_dim / 8 channels in SAM's mask decoder; SAM's logit is one more
            feature_channels = self.backbone.mask_decoder.transformer_dim // 8 + 1
        self.feature_channels = feature_channels
        self.sam_init = bool(sam_init) and self.unet is None

        k, d, dz = self.num_raters, self.rater_latent_dim, self.image_latent_dim
        alphas = torch.full((k, d), 0.1)
        ranks = torch.arange(k)
        alphas[ranks, ranks % d] = 1.0
        alphas[ranks, (ranks + d // 2) % d] = 1.0
        self.rater_alphas = nn.Parameter(alphas)
        self.statistic_heads = nn.ModuleList(nn.Conv2d(feature_channels, 2 * dz, 1) for _ in range(k))
        self.mask_head = nn.Sequential(
            nn.Conv2d(d + dz, head_channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(head_channels, head_channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(head_channels, 1, 1),
        )
        if self.sam_init:
            self._initialise_from_sam()
        self.rater_classifier = nn.Linear(d, k)
        self.reconstruction_heads = nn.ModuleList(nn.Conv2d(d + dz, 1, 1) for _ in range(k))

    @torch.no_grad()
    def _initialise_from_sam(self, small: float = 1e-3, scale: float = 0.1, sigma: float = 0.03) -> None:
        """Start the heads as an identity on SAM's logit through ``z_x``'s first channel (class docstring): that
        mean is ``scale`` times the logit and the ``mask_head`` multiplies it back by ``1 / scale``, so a step on a
        rater's head moves its logit ``1 / scale`` times as far (SAM's logits are steep, tens across a boundary)."""
        d = self.rater_latent_dim
        convs = [*self.statistic_heads, *(m for m in self.mask_head if isinstance(m, nn.Conv2d))]
        for conv in convs:
            nn.init.normal_(conv.weight, std=small)
            nn.init.zeros_(conv.bias)
        for head in self.statistic_heads:
            head.weight[0, -1] = scale  # mu of z_x channel 0 <- SAM's logit (the features' last channel)
            head.bias[self.image_latent_dim :] = math.log(sigma**2)  # every log-variance
        first, second, last = (m for m in self.mask_head if isinstance(m, nn.Conv2d))
        first.weight[0, d] = 1.0  # unit 0: the positive part of z_x channel 0, unit 1: the negative part
        first.weight[1, d] = -1.0
        second.weight[0, 0] = 1.0
        second.weight[1, 1] = 1.0
        last.weight[0, 0] = 1.0 / scale
        last.weight[0, 1] = -1.0 / scale

    # ------------------------------------------------------------------------------------ the saved raters
    def get_extra_state(self) -> dict:
        """Saved with the weights: the rater names and how rater ids were defined (plain types, so the state
        dict loads with ``weights_only=True``)."""
        return {"rater_names": list(self.rater_names), "rater_identity": self.rater_identity}

    def set_extra_state(self, state: dict) -> None:
        """Take the trained rater names (their count must match this network's ``K``).

        Raises:
            ValueError: the checkpoint's raters do not fit this network (another ``K`` or rater identity).
        """
        names = tuple(str(n) for n in state.get("rater_names", ()))
        identity = state.get("rater_identity", self.rater_identity)
        if len(names) != self.num_raters or identity != self.rater_identity:
            raise ValueError(
                f"the weights were trained with the raters {list(names)} ({identity}); this network has "
                f"{self.num_raters} ({self.rater_identity})"
            )
        self.rater_names = names

    # ------------------------------------------------------------------------------------------- the checks
    def check_inputs(self, embeddings: torch.Tensor, conditions: Conditions, num_samples: int | None = None) -> None:
        """The base class's checks, then the mode and the rater ids.

        Sampling reads neither the image nor (in the diverse default) a rater id, so when sampling the base class
        checks the other inputs with absent ones stood in for; training needs both (except the rater id with
        ``"anonymous"`` raters, which ignores it).

        Raises:
            ValueError: as :meth:`MaskSamplingNetwork.check_inputs`; an unknown mode; the personalised mode of a
                model trained on anonymous raters; a rater id that is not an integer in ``[0, K)``.
        """
        checked = conditions
        if num_samples is not None:
            stand_in = embeddings.new_zeros(embeddings.shape[0])
            checked = dataclasses.replace(
                conditions,
                images=stand_in if conditions.images is None else conditions.images,
                rater_ids=stand_in if conditions.rater_ids is None else conditions.rater_ids,
            )
        super().check_inputs(embeddings, checked, num_samples)
        if num_samples is not None:
            if conditions.mode is not None and conditions.mode not in MODES:
                raise ValueError(f"unknown mode {conditions.mode!r}: ProSeg offers {MODES} ('diverse' is the default)")
            if conditions.mode == "personalised" and self.rater_identity == "anonymous":
                raise ValueError("this ProSeg model was trained on anonymous raters: only the diverse mode")
        if conditions.rater_ids is None or self.rater_identity == "anonymous":
            return
        ids = conditions.rater_ids
        if ids.is_floating_point() and not torch.equal(ids, ids.round()):
            raise ValueError(f"rater ids must be integers, got {ids.tolist()}")
        for rater in ids.long().tolist():
            if rater >= self.num_raters:
                raise ValueError(f"rater id {rater} is beyond the {self.num_raters} raters this model was trained with")
            if rater < 0:
                raise ValueError(f"rater id {rater} is not a rater: ids run from 0 to {self.num_raters - 1}")

    def rater_ids_of(self, conditions: Conditions, batch: int, device: torch.device) -> torch.Tensor | None:
        """The rater id of each image (``(B,)`` long), rater 0 for every image with anonymous raters, or ``None``
        when the conditions name none."""
        if self.rater_identity == "anonymous":
            return torch.zeros(batch, dtype=torch.long, device=device)
        if conditions.rater_ids is None:
            return None
        return conditions.rater_ids.to(device).long().reshape(batch)

    # --------------------------------------------------------------------------------------- the pieces
    def parameter_groups(
        self, learning_rate: float, rater_learning_rate: float, backbone_learning_rate: float | None = None
    ) -> list[dict]:
        """Optimizer parameter groups: the rater latents (``rater_alphas``) and the ``rater_classifier`` at
        ``rater_learning_rate`` (the reference's two rates); the pretrained backbone's trainable parts (SAM's
        prompt encoder and mask decoder) at ``backbone_learning_rate``; everything else trainable (the heads, the
        U-Net) at ``learning_rate``.

        Args:
            learning_rate: the learning rate of the network.
            rater_learning_rate: the learning rate of the rater latents and classifier.
            backbone_learning_rate: the learning rate of the backbone's trainable parameters; ``None``:
                ``learning_rate`` (then the groups are the reference's two).

        Returns:
            ``[{"params": [...], "lr": learning_rate}, {"params": [...], "lr": rater_learning_rate}]`` and, with
            ``backbone_learning_rate`` and a trainable backbone, a third ``{"params": [...], "lr":
            backbone_learning_rate}``; only parameters with ``requires_grad``.
        """
        rater_params = [self.rater_alphas, *self.rater_classifier.parameters()]
        backbone_params = [p for p in self.backbone.parameters() if p.requires_grad]
        if backbone_learning_rate is None:
            backbone_params = []
        own = {id(p) for p in (*rater_params, *backbone_params)}
        network = [p for p in self.parameters() if p.requires_grad and id(p) not in own]
        groups = [
            {"params": network, "lr": float(learning_rate)},
            {"params": [p for p in rater_params if p.requires_grad], "lr": float(rater_learning_rate)},
        ]
        if backbone_params:
            groups.append({"params": backbone_params, "lr": float(backbone_learning_rate)})
        return groups

    def pixel_features(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The features the statistic heads read, once per image (see the class docstring).

        Args:
            embeddings: ``(B, C, h, w)`` SAM image embeddings, or ``(B, 1, S, S)`` images on the grid (``"unet"``).
            boxes: ``(B, 4)`` boxes in backbone input coordinates.

        Returns:
            ``(B, F, h', w')`` on the logit grid (``backbone.mask_size``); ``F = feature_channels``.
        """
        if self.unet is not None:
            size = self.backbone.image_size
            return self.unet(torch.cat([embeddings, box_masks(boxes, size).to(embeddings.dtype)], dim=1))
        upscaled: list[torch.Tensor] = []
        hook = self.backbone.mask_decoder.output_upscaling.register_forward_hook(
            lambda module, inputs, output: upscaled.append(output)
        )
        try:
            sparse, dense = self.backbone.embed_prompts(boxes=boxes)
            logits, _ = self.backbone.decode(embeddings, sparse, dense, multimask=False)  # (B, 1, 4h, 4w)
        finally:
            hook.remove()
        return torch.cat([torch.cat(upscaled), logits], dim=1)  # decode's calls come in image order

    def rater_posteriors(self, rater_ids: torch.Tensor) -> Dirichlet:
        """``Dir(softplus(alpha_r))`` of the raters ``rater_ids`` (any shape ``S``): batch shape ``S``, event
        ``(D,)``."""
        return Dirichlet(F.softplus(self.rater_alphas[rater_ids]))

    def image_statistics(self, features: torch.Tensor, rater_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of ``z_x`` from the statistic heads of the raters ``rater_ids``.

        Args:
            features: ``(B, F, h, w)``.
            rater_ids: ``(B, R)`` rater ``rater_ids[b, r]``'s head runs on image ``b``.

        Returns:
            ``mu`` and ``log_variance``, each ``(B, R, Dz, h, w)``.
        """
        return _rater_conv(self.statistic_heads, rater_ids, features).chunk(2, dim=2)

    def latents(self, rater_latents: torch.Tensor, image_latents: torch.Tensor) -> torch.Tensor:
        """``z_r`` tiled over the grid and concatenated with ``z_x``.

        Args:
            rater_latents: ``(B, N, D)``.
            image_latents: ``(B, N, Dz, h, w)``.

        Returns:
            ``(B, N, D + Dz, h, w)``.
        """
        tiled = rater_latents[..., None, None].expand(-1, -1, -1, *image_latents.shape[-2:])
        return torch.cat([tiled, image_latents], dim=2)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The ``mask_head`` on ``N`` latent maps per image, in one batch.

        Args:
            latents: ``(B, N, D + Dz, h, w)``.

        Returns:
            ``(B, N, h, w)`` logits.
        """
        b, n = latents.shape[:2]
        logits = self.mask_head(latents.flatten(0, 1)).view(b, n, *latents.shape[-2:])
        return logits

    def personalised_logits(self, features: torch.Tensor, rater_ids: torch.Tensor) -> torch.Tensor:
        """Each rater's deterministic prediction from its posterior means (Dirichlet mean, ``mu``).

        Args:
            features: ``(B, F, h, w)``.
            rater_ids: ``(B, R)``.

        Returns:
            ``(B, R, h, w)`` logits.
        """
        mu, _ = self.image_statistics(features, rater_ids)
        return self.decode_latents(self.latents(self.rater_posteriors(rater_ids).mean, mu))

    # ------------------------------------------------------------------------------------------- the hooks
    def draw_samples(self, embeddings: torch.Tensor, conditions: Conditions, num_samples: int) -> torch.Tensor:
        """``N`` masks per image in the mode ``conditions.mode`` (see the class docstring).

        Args:
            embeddings: ``(B, C, h, w)`` image embeddings (``(B, 1, S, S)`` grid images for ``"unet"``).
            conditions: ``boxes (B, 4)`` in backbone input coordinates; optionally ``rater_ids (B,)``, ``mode`` and
                ``noise_seeds``.
            num_samples: ``N >= 1``.

        Returns:
            ``(B, N, h', w')`` low-resolution mask logits (``backbone.mask_size``).
        """
        b, n = embeddings.shape[0], num_samples
        features = self.pixel_features(embeddings, conditions.boxes)
        ids = self.rater_ids_of(conditions, b, features.device)
        if ids is None:
            raters = torch.arange(min(n, self.num_raters), device=features.device).expand(b, -1)  # (B, R)
        else:
            raters = ids[:, None]
        if conditions.mode is None and n == 1 and not self.training:  # forward's one deterministic prediction
            if ids is None:
                raters = torch.arange(self.num_raters, device=features.device).expand(b, -1)
            probabilities = torch.sigmoid(self.personalised_logits(features, raters)).mean(dim=1, keepdim=True)
            return torch.logit(probabilities, eps=1e-6)
        slots = torch.arange(n, device=features.device) % raters.shape[1]  # sample i -> raters[:, i mod R]
        if conditions.mode == "personalised":
            return self.personalised_logits(features, raters)[:, slots]

        d, dz = self.rater_latent_dim, self.image_latent_dim
        h, w = features.shape[-2:]
        noise = conditions.standard_normal(b, n, d + dz * h * w, device=features.device, dtype=features.dtype)
        rater_latents = flat_dirichlet_from_normal(noise[..., :d])  # (B, N, D) from the prior Dir(1)
        mu, log_variance = self.image_statistics(features, raters)
        image_latents = mu[:, slots] + (0.5 * log_variance[:, slots]).exp() * noise[..., d:].view(b, n, dz, h, w)
        return self.decode_latents(self.latents(rater_latents, image_latents))

    def compute_training_outputs(
        self, embeddings: torch.Tensor, conditions: Conditions, rater_masks: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One training step: the prediction from posterior samples of both latents for the image's rater.

        Args (as :meth:`MaskSamplingNetwork.compute_training_outputs`):
            embeddings: ``(B, C, h, w)`` (``(B, 1, S, S)`` for ``"unet"``).
            conditions: ``boxes (B, 4)``, ``images (B, 1|3, H, W)`` (the reconstruction target) and ``rater_ids
                (B,)`` (ignored with anonymous raters).
            rater_masks: ``(B, 1, S, S)`` the rater's mask; the loss reads it, the network does not (the latents'
                posteriors are the rater's own, not conditioned on the mask).

        Returns:
            ``"logits" (B, 1, h', w')``; ``"rater_logits" (B, K)`` (the classifier on ``z_r``); ``"rater_ids"
            (B,)``; ``"reconstruction"`` and ``"reconstruction_target"`` ``(B, 1, h', w')`` (the image, one channel,
            resized bilinearly to the logit grid, no gradient); ``"kl_rater" (B,)``
            ``KL(Dir(softplus(alpha_r)) || Dir(1))``; ``"kl_image" (B,)`` :func:`gaussian_kl_to_prior`.

        Raises:
            ValueError: when ``rater_masks`` or the images are not 4D.
        """
        b = embeddings.shape[0]
        images = conditions.images
        if rater_masks.ndim != 4 or rater_masks.shape[:2] != (b, 1):
            raise ValueError(f"expected rater_masks of shape ({b}, 1, H, W), got {tuple(rater_masks.shape)}")
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape ({b}, 1 or 3, H, W), got {tuple(images.shape)}")
        features = self.pixel_features(embeddings, conditions.boxes)
        ids = self.rater_ids_of(conditions, b, features.device)
        posterior = self.rater_posteriors(ids)
        prior = Dirichlet(torch.ones_like(posterior.concentration))
        rater_latents = posterior.rsample()  # (B, D)
        mu, log_variance = (v[:, 0] for v in self.image_statistics(features, ids[:, None]))  # (B, Dz, h, w)
        image_latents = Normal(mu, (0.5 * log_variance).exp()).rsample()
        latents = self.latents(rater_latents[:, None], image_latents[:, None])  # (B, 1, D + Dz, h, w)

        target = images.as_tensor() if hasattr(images, "as_tensor") else images
        target = target.to(features.dtype).mean(dim=1, keepdim=True)
        if target.shape[-2:] != features.shape[-2:]:
            target = F.interpolate(target, size=tuple(features.shape[-2:]), mode="bilinear", align_corners=False,
                                   antialias=True)
        return {
            "logits": self.decode_latents(latents),
            "rater_logits": self.rater_classifier(rater_latents),
            "rater_ids": ids,
            "reconstruction": _rater_conv(self.reconstruction_heads, ids[:, None], latents)[:, 0],
            "reconstruction_target": target.detach(),
            "kl_rater": latent_kl_divergence(posterior, prior),
            "kl_image": gaussian_kl_to_prior(mu, log_variance, self.prior_log_variance),
        }
