"""ambisam: ambiguity-aware medical image segmentation with the Segment Anything Model.

Subpackages:
    sam: the SAM-family backbones behind one ``encode``/``decode`` interface, a named builder registry,
        LoRA, the embedding cache and a thin box predictor.
    data: the multi-rater data pipeline (datalists, MONAI dictionary transforms, synthetic data, converters).
    metrics: the field's distribution metrics (GED, HM-IoU, D_max, ...) as functions, MONAI metrics and
        Ignite handlers.
    inferers: the one sampling inferer every method plugs into.
"""

__version__ = "0.2.0"

__all__ = ["__version__"]
