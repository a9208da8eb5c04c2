"""One trainer for every method, with small overridable hooks (nnU-Net style): a method's variant is a tiny
subclass that overrides the hook it needs, never a copy of the loop.

A training step of :class:`MultiRaterTrainer`:

1. ``prepare_batch``: the batch to the device (:func:`prepare_multirater_batch` by default; MONAI's
   ``default_prepare_batch`` is replaced by it, since a multi-rater batch is more than image and label);
2. :meth:`~MultiRaterTrainer.conditions`: the method's :class:`~ambisam.networks.Conditions` from the batch,
   as its ``capabilities`` declare (the box when it needs a prompt, the image and the rater id when it reads
   them);
3. :meth:`~MultiRaterTrainer.target`: the training target the method declares (one rater's mask or all of them);
4. the network's ``forward(images, conditions, targets, training_outputs=True, embedding_cache=...)``: the
   encoder (or, for a frozen one, the embedding cache) and the method's training outputs in one forward, so
   that DDP sees the whole step;
5. :meth:`~MultiRaterTrainer.compute_loss`, under ``torch.autocast`` with a gradient scaler when ``amp``;
6. backward and optimizer step.

The batch is a dict from :func:`ambisam.data.training_slice_transforms`: ``image (B, 1, S, S)``,
``label (B, K, S, S)``, ``rater_mask (B, 1, S, S)`` (the randomly chosen rater's mask), ``box (B, 4)`` in
backbone input coordinates, ``rater_index (B,)`` and, from datalists with rater ids, ``rater_id (B,)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.utils.enums import CommonKeys as Keys

from ambisam.networks.base import Conditions
from ambisam.sam.cache import EmbeddingCache

__all__ = ["MultiRaterTrainer", "prepare_multirater_batch"]


def prepare_multirater_batch(batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs: Any) -> dict:
    """A multi-rater batch with every tensor on ``device`` (the trainer's default ``prepare_batch``).

    Args:
        batchdata: the collated batch dict.
        device: the target device.
        non_blocking: as ``Tensor.to``.
        kwargs: further arguments of ``Tensor.to``.

    Returns:
        A new dict; non-tensor values unchanged.

    Raises:
        ValueError: ``batchdata`` is not a dict.
    """
    if not isinstance(batchdata, Mapping):
        raise ValueError(f"a multi-rater batch is a dict, got {type(batchdata).__name__}")
    return {
        k: v.to(device, non_blocking=non_blocking, **kwargs) if isinstance(v, torch.Tensor) else v
        for k, v in batchdata.items()
    }


class MultiRaterTrainer(SupervisedTrainer):
    """MONAI ``SupervisedTrainer`` whose iteration trains any method of the method contract.

    Args:
        args, kwargs: as ``monai.engines.SupervisedTrainer`` (``device``, ``max_epochs``, ``train_data_loader``,
            ``network``, ``optimizer``, ``loss_function``, ``train_handlers``, ``amp``, ``prepare_batch``, ...).
            ``prepare_batch`` must return a dict (default :func:`prepare_multirater_batch`); ``inferer`` is not
            used by the step.
        embedding_cache: the frozen encoder's cache; ``None`` encodes every step.
    """

    def __init__(self, *args: Any, embedding_cache: EmbeddingCache | None = None, **kwargs: Any) -> None:
        if kwargs.get("prepare_batch", default_prepare_batch) is default_prepare_batch:
            kwargs["prepare_batch"] = prepare_multirater_batch
        super().__init__(*args, **kwargs)
        self.embedding_cache = embedding_cache

    # ----------------------------------------------------------------------------------------------- hooks
    @property
    def method(self) -> torch.nn.Module:
        """The method network (unwrapped from DDP)."""
        return getattr(self.network, "module", self.network)

    @property
    def target_key(self) -> str:
        """The batch key of the training target the method declares."""
        return self.method.capabilities.target_key

    def conditions(self, batch: Mapping) -> Conditions:
        """The method's conditions for this batch, as its capabilities declare."""
        capabilities = self.method.capabilities
        rater_ids = batch.get("rater_id", batch.get("rater_index"))
        return Conditions(
            boxes=batch.get("box") if capabilities.needs_prompt else None,
            images=batch["image"] if "image" in capabilities.conditions else None,
            rater_ids=torch.as_tensor(rater_ids) if "rater_id" in capabilities.conditions else None,
        )

    def target(self, batch: Mapping) -> torch.Tensor:
        """The training target of this batch."""
        return batch[self.target_key]

    def training_outputs(self, batch: Mapping) -> dict:
        """The network's outputs for one step, through its ``forward`` (encoder or cache included)."""
        return self.network(
            batch["image"], self.conditions(batch), self.target(batch),
            training_outputs=True, embedding_cache=self.embedding_cache,
        )

    def compute_loss(self, outputs: dict, batch: Mapping) -> torch.Tensor:
        """The scalar loss of one step; a loss that takes ``rater_valid`` (set losses) is told which raters read
        each image, so a rater who did not read it is not trained as one who saw nothing."""
        if "rater_valid" in batch and "rater_valid" in inspect.signature(self.loss_function.forward).parameters:
            return self.loss_function(outputs, self.target(batch), rater_valid=batch["rater_valid"])
        return self.loss_function(outputs, self.target(batch))

    # ------------------------------------------------------------------------------------------------ loop
    def _iteration(self, engine: MultiRaterTrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        engine.state.output = {Keys.IMAGE: batch["image"], Keys.LABEL: self.target(batch)}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with torch.autocast(engine.state.device.type if hasattr(engine.state.device, "type") else "cpu",
                            enabled=bool(engine.amp)):
            outputs = self.training_outputs(batch)
            engine.state.output[Keys.PRED] = outputs["logits"]
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = self.compute_loss(outputs, batch)
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        components = getattr(self.loss_function, "components", None)
        if callable(components):  # e.g. BCE, Dice and KL parts, for the logs
            engine.state.output.update({f"loss_{k}": float(v) for k, v in components().items()})
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # decollates the output when decollate=True
        return engine.state.output
