"""One trainer for every method, with small overridable hooks (nnU-Net style): a method's variant is a tiny
subclass that overrides the hook it needs, never a copy of the loop.

A training step of :class:`MultiRaterTrainer`:

1. :meth:`~MultiRaterTrainer.embed`: image embeddings of the batch's slices, from the embedding cache when the
   image encoder is frozen (the step then costs decoder time, not encoder time), else from the encoder with
   gradients (P2SAM's LoRA stage);
2. :meth:`~MultiRaterTrainer.training_outputs`: the network's training outputs for those embeddings and the
   batch's prompts and targets (``network.training_outputs(...)``);
3. :meth:`~MultiRaterTrainer.compute_loss`: the loss function on those outputs and the batch;
4. backward and optimizer step.

The batch is a dict from :func:`ambisam.data.training_slice_transforms`: ``image (B, 1, S, S)``,
``label (B, K, S, S)``, ``rater_mask (B, 1, S, S)`` (the randomly chosen rater's mask), ``box (B, 4)`` in
backbone input coordinates, ``rater_index (B,)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from ambisam.sam.cache import EmbeddingCache

__all__ = ["MultiRaterTrainer", "SetTrainer"]


class MultiRaterTrainer(SupervisedTrainer):
    """MONAI ``SupervisedTrainer`` whose iteration trains a method from (cached) image embeddings.

    Args:
        args, kwargs: as ``monai.engines.SupervisedTrainer`` (``device``, ``max_epochs``,
            ``train_data_loader``, ``network``, ``optimizer``, ``loss_function``, ``train_handlers``, ...).
            ``inferer`` and ``prepare_batch`` are not used by the step.
        embedding_cache: the cache for the frozen encoder; ``None`` encodes every step.
        target_key: the batch key of the training target handed to the loss (default: the chosen rater).
    """

    def __init__(self, *args, embedding_cache: EmbeddingCache | None = None, target_key: str = "rater_mask", **kwargs):
        super().__init__(*args, **kwargs)
        self.embedding_cache = embedding_cache
        self.target_key = target_key

    # ----------------------------------------------------------------------------------------------- hooks
    @property
    def method(self) -> torch.nn.Module:
        """The method network (unwrapped from DDP)."""
        return getattr(self.network, "module", self.network)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, C, h, w)`` of ``images (B, 1, S, S)``; cached and gradient-free when the encoder is
        frozen."""
        backbone = self.method.backbone
        if any(p.requires_grad for p in backbone.image_encoder.parameters()):
            return backbone.encode(images)
        with torch.no_grad():
            if self.embedding_cache is not None:
                return self.embedding_cache(images).to(images.device)
            return backbone.encode(images)

    def training_outputs(self, batch: Mapping, embeddings: torch.Tensor) -> dict:
        """The network's outputs for one step (default: the target is one rater's mask).

        Goes through the network's ``forward`` (``training_outputs=True``) so that a DDP wrapper synchronises
        gradients.
        """
        return self.network(embeddings, batch["box"], batch[self.target_key], training_outputs=True)

    def compute_loss(self, outputs: dict, batch: Mapping) -> torch.Tensor:
        """The scalar loss of one step."""
        return self.loss_function(outputs, batch[self.target_key])

    # ------------------------------------------------------------------------------------------------ loop
    def _iteration(self, engine: MultiRaterTrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = {
            k: v.to(engine.state.device, non_blocking=engine.non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batchdata.items()
        }
        engine.state.output = {Keys.IMAGE: batch["image"], Keys.LABEL: batch[self.target_key]}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        embeddings = self.embed(batch["image"])
        outputs = self.training_outputs(batch, embeddings)
        engine.state.output[Keys.PRED] = outputs["logits"]
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss = self.compute_loss(outputs, batch)
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        components = getattr(self.loss_function, "components", None)
        if callable(components):  # e.g. BCE, Dice and KL parts, for the logs
            engine.state.output.update({f"loss_{k}": float(v) for k, v in components().items()})
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # decollates the output when decollate=True
        return engine.state.output


class SetTrainer(MultiRaterTrainer):
    """Variant for methods trained against all K raters at once (set losses): the target is ``label``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("target_key", "label")
        super().__init__(*args, **kwargs)
