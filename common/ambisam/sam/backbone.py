"""One interface over every SAM-family backbone: :class:`SamBackbone`, a pure ``nn.Module``.

The interface separates the expensive part from the cheap one, so that a method encodes an image once and
draws all its samples from that one embedding:

- :meth:`SamBackbone.encode`: images in ``[0, 1]`` at any size -> image embeddings ``(B, 256, h, w)``;
- :meth:`SamBackbone.embed_prompts`: boxes (and an optional low-resolution mask) -> SAM's sparse and dense
  prompt embeddings; :meth:`SamBackbone.dense_prompt_factors` gives the dense one in factored form
  (:class:`DensePromptFactors`), for modules that apply a linear map to it and can fold that map into SAM's last
  mask-prompt layer instead of running it on all ``C`` channels;
- :meth:`SamBackbone.decode`: embeddings + prompt embeddings -> low-resolution mask logits and IoU scores,
  with any number of prompts per image.

Each backbone's own input size and pixel normalisation live here (``preprocess``), and so does the mapping of
boxes between image pixels and backbone input coordinates (``boxes_to_input``). Images are resized to the
square backbone input directly (as MedSAM and LiteMedSAM do), not padded.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ambisam.sam.precision import autocast_dtype, check_precision

__all__ = ["SamBackbone", "DensePromptFactors"]


class DensePromptFactors(NamedTuple):
    """SAM's dense prompt embedding written as ``projection @ features + offset`` at every position of the grid.

    SAM embeds a mask prompt by a small convolutional stem ending in a ``1 x 1`` convolution to ``C`` channels, and
    embeds "no mask" as one learned vector repeated over the grid; both are an affine map of a thin feature map.
    A module that applies a linear map (a convolution) to the dense embedding can apply it to these factors
    instead, for the same result at a fraction of the cost (:meth:`materialize` gives the embedding itself).

    Attributes:
        features: ``(B, c, h, w)`` the mask stem's features before its last layer (``c = 16`` for SAM), or
            ``None`` for no mask prompt (the embedding is ``offset`` everywhere).
        projection: ``(C, c)`` the last layer's weight, or ``None`` when ``features`` already is the embedding.
        offset: ``(C,)`` added at every position (the last layer's bias, or SAM's no-mask embedding).
        batch_size: ``B``.
        size: ``(h, w)`` of the grid (the image embedding's).
    """

    features: torch.Tensor | None
    projection: torch.Tensor | None
    offset: torch.Tensor
    batch_size: int
    size: tuple[int, int]

    def materialize(self) -> torch.Tensor:
        """The dense prompt embedding ``(B, C, h, w)`` (what SAM's prompt encoder returns)."""
        offset = self.offset.view(1, -1, 1, 1)
        if self.features is None:
            return offset.expand(self.batch_size, -1, *self.size)
        if self.projection is None:
            return self.features + offset
        return F.conv2d(self.features, self.projection[:, :, None, None]) + offset


class SamBackbone(nn.Module):
    """A SAM-family model (image encoder, prompt encoder, mask decoder) behind one interface.

    The attribute names match segment-anything's ``Sam`` so that SAM, MedSAM and LiteMedSAM checkpoints load
    into it strictly.

    Args:
        name: the registry name this backbone was built under (``"litemedsam"``, ``"vit_b"``, ...).
        image_encoder: maps ``(B, 3, S, S)`` to ``(B, C, S/16, S/16)`` (TinyViT gives ``S/4`` of a 256 input).
        prompt_encoder: segment-anything ``PromptEncoder``.
        mask_decoder: segment-anything ``MaskDecoder``.
        image_size: the square input size ``S`` the image encoder expects (256 LiteMedSAM, 1024 SAM).
        pixel_mean: per-channel mean on the 0..255 scale, or ``None`` for encoders trained on ``[0, 1]`` input
            without normalisation (MedSAM, LiteMedSAM).
        pixel_std: per-channel standard deviation on the 0..255 scale (with ``pixel_mean``).
        prompts_per_call: the most prompts of one image :meth:`decode` gives the mask decoder at once, or
            ``None`` for :data:`CPU_PROMPTS_PER_CALL` on a CPU and all of them on a GPU. SAM's decoder copies the
            image embedding once per prompt; on a CPU a call with many prompts runs out of cache and costs about
            twice as much per prompt as calls with two (LiteMedSAM, 2 threads: 120 against 63 ms per prompt for
            16 prompts), while a GPU wants them all at once. The result is the same either way.
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"`` (:mod:`ambisam.sam.precision`): what :meth:`encode` and
            :meth:`decode` compute in. Settable afterwards (:attr:`precision`).

    Raises:
        ValueError: ``prompts_per_call`` below 1.
        InputError: an unknown ``precision``.
    """

    #: prompts per mask decoder call on a CPU when ``prompts_per_call`` is ``None``
    CPU_PROMPTS_PER_CALL = 2

    def __init__(
        self,
        name: str,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        image_size: int,
        pixel_mean: tuple[float, float, float] | None = None,
        pixel_std: tuple[float, float, float] | None = None,
        prompts_per_call: int | None = None,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        self.precision = precision
        if prompts_per_call is not None and prompts_per_call < 1:
            raise ValueError(f"prompts_per_call must be at least 1 or None, got {prompts_per_call}")
        self.prompts_per_call = prompts_per_call
        self.name = name
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = int(image_size)
        self.normalize = pixel_mean is not None
        mean = torch.tensor(pixel_mean if pixel_mean is not None else (0.0, 0.0, 0.0)).view(-1, 1, 1)
        std = torch.tensor(pixel_std if pixel_std is not None else (1.0, 1.0, 1.0)).view(-1, 1, 1)
        # not persistent: checkpoints of SAM and its derivatives do not carry them
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self._dense_pe: tuple[tuple, torch.Tensor] | None = None  # (key, SAM's positional encoding of the grid)
        # the decoder's two-way transformer runs in the compute dtype, the layers after it in float32
        self._autocasts: list = []  # the autocast contexts the transformer hooks entered, innermost last
        self._decoder_dtype: torch.dtype | None = None  # set by decode while the mask decoder runs
        transformer = getattr(mask_decoder, "transformer", None)
        if isinstance(transformer, nn.Module):
            transformer.register_forward_pre_hook(self._enter_transformer)
            transformer.register_forward_hook(self._leave_transformer, always_call=True)
        # the encoder's patch embedding (its first convolutions, on the image itself) stays in float32 under
        # autocast: bfloat16's 8-bit mantissa on the input intensities is what moved the mask boundaries most
        # (LiteMedSAM, `bench precision` on the LIDC sample and 3 synthetic slices: Dice against float32 mean 0.976,
        # min 0.80 with it in bfloat16; mean 0.981, min 0.91, a one-pixel change of a 6-pixel mask, without)
        patch_embed = getattr(image_encoder, "patch_embed", None)
        if isinstance(patch_embed, nn.Module):
            patch_embed.register_forward_pre_hook(self._enter_float32)
            patch_embed.register_forward_hook(self._leave_float32, always_call=True)

    @property
    def precision(self) -> str:
        """``"fp32"``, ``"bf16"`` or ``"auto"``: the encoder and the decoder's transformer run under
        ``torch.autocast`` in :meth:`compute_dtype` (see :mod:`ambisam.sam.precision`); embeddings and logits are
        float32 either way. Setting it checks the value (:class:`~ambisam.errors.InputError` if unknown)."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = check_precision(value)

    def compute_dtype(self, device: torch.device | str | None = None) -> torch.dtype:
        """The dtype the encoder and the decoder's transformer compute in on ``device`` (default: the backbone's).

        Args:
            device: where the computation runs.

        Returns:
            ``torch.float32`` (no autocast), ``torch.bfloat16`` or ``torch.float16``.
        """
        if device is None:
            device = self.pixel_mean.device
        return autocast_dtype(self._precision, device)

    def _push_autocast(self, context: torch.autocast | None) -> None:
        """Enter ``context`` (``None``: none) and stack it for :meth:`_pop_autocast`, in a module's pre-hook."""
        if context is not None:
            context.__enter__()
        self._autocasts.append(context)

    def _pop_autocast(self) -> bool:
        """Leave the context the matching :meth:`_push_autocast` entered, in the module's forward hook; whether
        there was one."""
        context = self._autocasts.pop() if self._autocasts else None
        if context is not None:
            context.__exit__(None, None, None)
        return context is not None

    def _enter_transformer(self, module: nn.Module, args: tuple) -> None:
        dtype = self._decoder_dtype
        low = dtype is not None and dtype != torch.float32
        self._push_autocast(torch.autocast(args[0].device.type, dtype=dtype) if low else None)

    def _leave_transformer(self, module: nn.Module, args: tuple, output):
        return tuple(o.float() for o in output) if self._pop_autocast() else None

    def _enter_float32(self, module: nn.Module, args: tuple) -> None:
        kind = args[0].device.type
        self._push_autocast(torch.autocast(kind, enabled=False) if torch.is_autocast_enabled(kind) else None)

    def _leave_float32(self, module: nn.Module, args: tuple, output) -> None:
        self._pop_autocast()

    @property
    def embedding_size(self) -> tuple[int, int]:
        """Spatial size ``(h, w)`` of the image embedding."""
        return tuple(self.prompt_encoder.image_embedding_size)

    @property
    def mask_size(self) -> tuple[int, int]:
        """Spatial size of the low-resolution mask logits (and of a mask prompt): ``4 * embedding_size``."""
        return tuple(self.prompt_encoder.mask_input_size)

    @property
    def num_multimask_outputs(self) -> int:
        """Masks :meth:`decode` returns with ``multimask=True`` (3 for SAM; see ``expand_multimask_outputs``)."""
        return int(self.mask_decoder.num_multimask_outputs)

    @property
    def embedding_dim(self) -> int:
        """Channels ``C`` of the image embedding and of every prompt token (256 for the SAM family)."""
        return int(self.prompt_encoder.embed_dim)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Bring images to the encoder's input: 3 channels, ``S x S``, the backbone's pixel normalisation.

        Args:
            images: ``(B, 1 or 3, H, W)`` intensities scaled to ``[0, 1]``.

        Returns:
            ``(B, 3, S, S)``.

        Raises:
            ValueError: when ``images`` is not 4D or has other than 1 or 3 channels.
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
        # a plain tensor from here on: MONAI's MetaTensor would track metadata through every encoder op
        x = (images.as_tensor() if hasattr(images, "as_tensor") else images).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        if self.normalize:
            x = (x * 255.0 - self.pixel_mean) / self.pixel_std
        return x

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings.

        Args:
            images: ``(B, 1 or 3, H, W)`` intensities in ``[0, 1]``, any ``H, W``.

        Returns:
            ``(B, C, h, w)`` float32 (computed in :meth:`compute_dtype`), ``C = embedding_dim``,
            ``(h, w) = embedding_size``.
        """
        x = self.preprocess(images)
        dtype = self.compute_dtype(x.device)
        if dtype == torch.float32:
            return self.image_encoder(x)
        with torch.autocast(x.device.type, dtype=dtype):
            embeddings = self.image_encoder(x)
        return embeddings.float()

    def boxes_to_input(self, boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Map ``[x_min, y_min, x_max, y_max]`` boxes from image pixels to backbone input coordinates.

        Args:
            boxes: ``(..., 4)``, x along the image's columns (width ``W``), y along its rows (height ``H``).
            image_size: ``(H, W)`` of the image the boxes refer to.

        Returns:
            ``(..., 4)`` float boxes in the ``S x S`` input frame.
        """
        h, w = image_size
        scale = boxes.new_tensor([self.image_size / w, self.image_size / h] * 2, dtype=torch.float32)
        return boxes.float() * scale

    def embed_prompts(
        self, boxes: torch.Tensor | None = None, masks: torch.Tensor | None = None, batch_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's prompt embeddings for boxes and/or low-resolution mask prompts.

        Args:
            boxes: ``(P, 4)`` boxes in backbone input coordinates, or ``None``.
            masks: ``(P, 1, 4h, 4w)`` mask logits used as a dense prompt, or ``None`` for SAM's learned
                no-mask embedding.
            batch_size: ``P`` when neither boxes nor masks are given (SAM's "default prompt").

        Returns:
            ``sparse (P, T, C)`` and ``dense (P, C, h, w)``.
        """
        if boxes is None and masks is None:
            sparse, dense = self.prompt_encoder(points=None, boxes=None, masks=None)
            n = batch_size or 1
            return sparse.expand(n, -1, -1), dense.expand(n, -1, -1, -1)
        return self.prompt_encoder(points=None, boxes=boxes, masks=masks)

    def dense_prompt_factors(self, masks: torch.Tensor | None = None, batch_size: int = 1) -> DensePromptFactors:
        """SAM's dense prompt embedding of a mask prompt (or of none) in factored form.

        ``dense_prompt_factors(masks).materialize()`` equals ``embed_prompts(..., masks=masks)[1]``; the factors
        let a following linear map skip the ``c -> C`` expansion (see :class:`DensePromptFactors`). A prompt
        encoder whose mask stem does not end in a ``1 x 1`` convolution gives the embedding itself as
        ``features`` (``projection=None``, zero ``offset``).

        Args:
            masks: ``(B, 1, 4h, 4w)`` mask logits, or ``None`` for SAM's learned no-mask embedding.
            batch_size: ``B`` when ``masks`` is ``None``.

        Returns:
            :class:`DensePromptFactors` on the ``embedding_size`` grid.
        """
        encoder = self.prompt_encoder
        if masks is None:
            return DensePromptFactors(None, None, encoder.no_mask_embed.weight[0], int(batch_size), self.embedding_size)
        stem = encoder.mask_downscaling
        last = stem[-1]
        if isinstance(last, nn.Conv2d) and last.kernel_size == (1, 1) and last.stride == (1, 1) and last.groups == 1:
            features = stem[:-1](masks)
            offset = last.bias if last.bias is not None else features.new_zeros(last.out_channels)
            return DensePromptFactors(features, last.weight[:, :, 0, 0], offset, masks.shape[0], self.embedding_size)
        dense = encoder._embed_masks(masks)
        return DensePromptFactors(dense, None, dense.new_zeros(dense.shape[1]), masks.shape[0], self.embedding_size)

    def dense_pe(self) -> torch.Tensor:
        """SAM's positional encoding of the embedding grid, ``(1, C, h, w)``.

        The same at every decoder call (a fixed random-Fourier encoding of the grid): computed once and kept
        until the prompt encoder's encoding matrix changes (another device or dtype, or new values).
        """
        gaussian = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        key = (gaussian.device, gaussian.dtype, gaussian.data_ptr(), gaussian._version)
        if self._dense_pe is None or self._dense_pe[0] != key:
            with torch.no_grad():
                self._dense_pe = (key, self.prompt_encoder.get_dense_pe())
        return self._dense_pe[1]

    def decode(
        self,
        embeddings: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits for ``P`` prompts per image, each image's embedding used for all of its prompts.

        Prompts are grouped by image: rows ``b * P`` to ``(b + 1) * P - 1`` of ``sparse``/``dense`` belong to
        ``embeddings[b]``. The image embedding is never recomputed or copied per prompt beyond what SAM's
        decoder does itself; the prompts of an image go to the decoder ``prompts_per_call`` at a time. The
        decoder's two-way transformer computes in :meth:`compute_dtype`; its upscaling, hypernetwork MLPs, mask
        product and IoU head in float32.

        Args:
            embeddings: ``(B, C, h, w)`` image embeddings.
            sparse: ``(B * P, T, C)`` sparse prompt embeddings.
            dense: ``(B * P, C, h, w)`` dense prompt embeddings.
            multimask: the decoder's multimask outputs instead of its single-mask output.

        Returns:
            ``logits (B * P, M, 4h, 4w)`` and ``iou (B * P, M)``, ``M = num_multimask_outputs`` (SAM: 3) with
            ``multimask`` else 1.

        Raises:
            ValueError: when the number of prompts is not a multiple of the number of images.
        """
        b = embeddings.shape[0]
        if sparse.shape[0] % b or dense.shape[0] != sparse.shape[0]:
            raise ValueError(
                f"{sparse.shape[0]} sparse / {dense.shape[0]} dense prompts do not split evenly over {b} images"
            )
        p = sparse.shape[0] // b
        chunk = self.prompts_per_call or (self.CPU_PROMPTS_PER_CALL if embeddings.device.type == "cpu" else p)
        image_pe = self.dense_pe()
        logits, ious = [], []
        self._decoder_dtype = self.compute_dtype(embeddings.device)
        try:
            for i in range(b):
                for start in range(i * p, (i + 1) * p, chunk):
                    rows = slice(start, min(start + chunk, (i + 1) * p))
                    lg, iou = self.mask_decoder(
                        image_embeddings=embeddings[i : i + 1],
                        image_pe=image_pe,
                        sparse_prompt_embeddings=sparse[rows],
                        dense_prompt_embeddings=dense[rows],
                        multimask_output=multimask,
                    )
                    logits.append(lg)
                    ious.append(iou)
        finally:
            self._decoder_dtype = None
        return torch.cat(logits), torch.cat(ious)

    def decode_boxes(
        self, embeddings: torch.Tensor, boxes: torch.Tensor, multimask: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shortcut: :meth:`embed_prompts` on boxes, then :meth:`decode`.

        Args:
            embeddings: ``(B, C, h, w)``.
            boxes: ``(B * P, 4)`` boxes in backbone input coordinates, grouped by image.
            multimask: as in :meth:`decode`.

        Returns:
            As :meth:`decode`.
        """
        sparse, dense = self.embed_prompts(boxes=boxes)
        return self.decode(embeddings, sparse, dense, multimask=multimask)

    @staticmethod
    def postprocess(logits: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Resize low-resolution logits back to the image's own size.

        Args:
            logits: ``(B, M, 4h, 4w)``.
            image_size: ``(H, W)``.

        Returns:
            ``(B, M, H, W)`` logits.
        """
        if tuple(logits.shape[-2:]) == tuple(image_size):
            return logits
        return F.interpolate(logits, size=tuple(image_size), mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Box-prompted segmentation, one box per image: ``(B, 1|3, H, W)``, ``(B, 4)`` pixel boxes ->
        ``(B, 1, H, W)`` logits."""
        size = tuple(images.shape[-2:])
        logits, _ = self.decode_boxes(self.encode(images), self.boxes_to_input(boxes, size))
        return self.postprocess(logits, size)
