"""SAM-family backbones behind one interface (see :mod:`ambisam.sam.backbone`; what the rest of ambisam needs of
any backbone is :class:`ImageBackbone`), their named builders, multimask outputs, LoRA, the embedding cache,
and the box predictor."""

from ambisam.sam.backbone import DensePromptFactors, SamBackbone
from ambisam.sam.build import (
    CHECKPOINT_SOURCES,
    DEFAULT_BACKBONE,
    backbone_registry,
    backbone_weights_file,
    build_backbone,
    check_state_dict_fits,
    load_state_dict,
    read_state_dict,
)
from ambisam.sam.cache import EmbeddingCache, encoder_fingerprint, encoder_state_token
from ambisam.sam.multimask import expand_multimask_outputs, multimask_token_sources
from ambisam.sam.lora import add_encoder_lora, lora_parameters, train_only_lora
from ambisam.sam.qkv_lora import FusedQKVLoRA, add_qv_lora, merge_lora, qkv_rows
from ambisam.sam.protocol import ImageBackbone
from ambisam.sam.precision import (
    PRECISIONS,
    autocast_dtype,
    check_precision,
    cpu_has_native_bf16,
    resolve_precision,
    set_precision,
)
from ambisam.sam.predictor import BoxPredictor, scale_to_unit, segment_with_box

__all__ = [
    "ImageBackbone",
    "SamBackbone",
    "DensePromptFactors",
    "CHECKPOINT_SOURCES",
    "DEFAULT_BACKBONE",
    "backbone_registry",
    "build_backbone",
    "backbone_weights_file",
    "load_state_dict",
    "read_state_dict",
    "check_state_dict_fits",
    "expand_multimask_outputs",
    "multimask_token_sources",
    "EmbeddingCache",
    "encoder_fingerprint",
    "encoder_state_token",
    "add_encoder_lora",
    "lora_parameters",
    "train_only_lora",
    "FusedQKVLoRA",
    "add_qv_lora",
    "merge_lora",
    "qkv_rows",
    "BoxPredictor",
    "scale_to_unit",
    "segment_with_box",
    "PRECISIONS",
    "check_precision",
    "cpu_has_native_bf16",
    "resolve_precision",
    "autocast_dtype",
    "set_precision",
]
