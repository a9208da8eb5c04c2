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

Slice batches (``slice_batch_size``, the base config's ``train_slice_batch_size``): a loader batch is the
selected slices of ``batch_size`` volumes, as many as a volume has marked, and back-propagating through all of
them at once makes training memory grow with the lesion's extent (SeqSAM, which back-propagates through its
sequential steps for every slice, peaked at 6.9 GiB on the synthetic set). A batch of more slices than
``slice_batch_size`` is trained in slice batches with the step's maths unchanged (one optimizer step, the same
loss and the same gradients as the whole batch, within float rounding, for any loss): the network's training
outputs are computed slice batch by slice batch without a graph, the loss on all of them (what is logged and
scaled), its gradient with respect to those outputs taken, and each slice batch is run again with a graph and
back-propagated with its share of that gradient (gradient accumulation; the random draws of each slice batch are
replayed, so a stochastic method sees the same draws twice). Peak memory is then one slice batch's graph; the
price is one extra gradient-free forward pass of the decoder per split step. Embeddings are looked up once per
step. The network must treat the slices of a batch independently (every method here does: no batch
normalisation), and declare in ``shared_training_outputs`` the outputs that are not per slice (P2SAM's assembling
weights and L2 term); a 0-dimensional output, or one whose first size is not the slice batch's, is shared too.

Seeds per epoch (``seed``): every epoch starts from random generators seeded by ``seed + epoch`` (Python's, NumPy's and
torch's through ``monai.utils.set_determinism``, and the loader's random transforms through
``monai.data.utils.set_rnd``), before the epoch's loader iterator is made (its shuffle order and worker seeds). An
epoch's draws then depend on the seed and the epoch only, not on what ran before it: a run resumed from the
checkpoint of epoch ``k`` (after a crash or a SIGKILL anywhere in epoch ``k + 1``) trains the same batches with
the same draws as the run that was not interrupted, and ends at the same weights (bit-identical on CPU).

The batch is a dict from :func:`ambisam.data.training_slice_transforms`: ``image (B, 1, S, S)``,
``label (B, K, S, S)``, ``rater_mask (B, 1, S, S)`` (the randomly chosen rater's mask), ``box (B, 4)`` in
backbone input coordinates, ``rater_index (B,)`` and, from datalists with rater ids, ``rater_id (B,)``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Events
from monai.data.utils import set_rnd
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.utils import set_determinism
from monai.utils.enums import CommonKeys as Keys

from ambisam.networks.base import Conditions
from ambisam.sam.cache import EmbeddingCache

__all__ = ["MultiRaterTrainer", "prepare_multirater_batch", "slice_batches", "take_slices"]


_OWN_CACHE = object()  # training_outputs' default: the trainer's own embedding cache


def slice_batches(num_slices: int, slice_batch_size: int | None) -> list[slice]:
    """The slice batches a step of ``num_slices`` slices is trained in: one when it fits ``slice_batch_size``
    (or there is no bound), else consecutive runs of ``slice_batch_size`` (the last one shorter).

    Args:
        num_slices: the loader batch's slices.
        slice_batch_size: the most slices a slice batch holds, or ``None``.

    Returns:
        ``slice`` objects covering ``range(num_slices)`` in order.
    """
    if slice_batch_size is None or num_slices <= slice_batch_size:
        return [slice(0, num_slices)]
    return [slice(a, min(a + slice_batch_size, num_slices)) for a in range(0, num_slices, slice_batch_size)]


def take_slices(batch: Mapping, part: slice, num_slices: int) -> dict:
    """The slices ``part`` of a batch of ``num_slices``: every tensor, list or tuple of ``num_slices`` rows cut,
    everything else as it is."""
    return {
        k: v[part] if isinstance(v, (torch.Tensor, list, tuple)) and len(v) == num_slices and
        (not isinstance(v, torch.Tensor) or v.ndim > 0) else v
        for k, v in batch.items()
    }


class _ReplayedEmbeddings:
    """An embedding cache stand-in for one slice batch: the first call asks the real cache (or, with none, the
    encoder), later calls get the same embeddings back, so that a slice batch run twice looks its slices up
    once."""

    def __init__(self, network: torch.nn.Module, cache: EmbeddingCache | None) -> None:
        self.network, self.cache, self.embeddings = network, cache, None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.embeddings is None:
            self.embeddings = self.cache(images) if self.cache is not None else self.network.backbone.encode(images)
        return self.embeddings


class _RngState:
    """The random generators' state (CPU and, where used, the batch's CUDA device), to replay a slice batch's
    draws."""

    def __init__(self, device: torch.device | None) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = None
        if device is not None and device.type == "cuda":
            self.device = device
            self.cuda = torch.cuda.get_rng_state(device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


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
        slice_batch_size: most slices whose graph a step holds at once (see the module docstring); ``None`` trains
            every batch whole.
        seed: the run's seed; each epoch's random generators are seeded by ``seed + epoch`` when it starts (see the
            module docstring), so that a resumed run repeats the interrupted one. ``None``: the generators run on
            from whatever state they are in (a resumed run then draws differently).

    Attributes:
        prediction_key: the training output logged as the step's prediction (``"logits"``; a subclass for another
            kind of network names its own).

    Raises:
        ValueError: ``slice_batch_size`` below 1.
    """

    prediction_key = "logits"

    def __init__(
        self,
        *args: Any,
        embedding_cache: EmbeddingCache | None = None,
        slice_batch_size: int | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("prepare_batch", default_prepare_batch) is default_prepare_batch:
            kwargs["prepare_batch"] = prepare_multirater_batch
        if slice_batch_size is not None and int(slice_batch_size) < 1:
            raise ValueError(f"slice_batch_size must be at least 1 or None, got {slice_batch_size}")
        super().__init__(*args, **kwargs)
        self.embedding_cache = embedding_cache
        self.slice_batch_size = None if slice_batch_size is None else int(slice_batch_size)
        self.seed = None if seed is None else int(seed)
        if self.seed is not None:
            # Ignite makes an epoch's loader iterator after EPOCH_STARTED's handlers have run
            self.add_event_handler(Events.EPOCH_STARTED, self.seed_epoch)

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

    def training_outputs(self, batch: Mapping, embedding_cache: Any = _OWN_CACHE) -> dict:
        """The network's outputs for one step, through its ``forward`` (encoder or cache included).

        Args:
            batch: the prepared batch (or one slice batch of it).
            embedding_cache: what serves the embeddings; default :attr:`embedding_cache`.

        Returns:
            The network's training outputs.
        """
        cache = self.embedding_cache if embedding_cache is _OWN_CACHE else embedding_cache
        return self.network(
            batch["image"], self.conditions(batch), self.target(batch), training_outputs=True, embedding_cache=cache
        )

    def compute_loss(self, outputs: dict, batch: Mapping) -> torch.Tensor:
        """The scalar loss of one step; a loss that takes ``rater_valid`` (set losses) is told which raters read
        each image, so a rater who did not read it is not trained as one who saw nothing."""
        if "rater_valid" in batch and "rater_valid" in inspect.signature(self.loss_function.forward).parameters:
            return self.loss_function(outputs, self.target(batch), rater_valid=batch["rater_valid"])
        return self.loss_function(outputs, self.target(batch))

    def seed_epoch(self, engine: MultiRaterTrainer) -> None:
        """Seed this epoch's random generators by ``seed + epoch`` (the loader's transforms too)."""
        epoch_seed = self.seed + int(engine.state.epoch)
        set_determinism(seed=epoch_seed)
        dataset = getattr(engine.data_loader, "dataset", None)
        if dataset is not None:
            set_rnd(getattr(dataset, "transform", dataset), epoch_seed)

    # ------------------------------------------------------------------------------------------------ loop
    def _shared_outputs(self) -> tuple[str, ...]:
        return tuple(getattr(self.method, "shared_training_outputs", ()))

    def _gradient_free_outputs(self, batch: Mapping, parts: Sequence[slice], num_slices: int) -> tuple:
        """Pass 1 of a split step: each slice batch's training outputs without a graph, joined into the whole
        batch's (a per-slice output concatenated, a shared one taken from the first slice batch), floating-point
        ones as leaves that require a gradient.

        Returns:
            The joined outputs, the per-slice output names, and per slice batch its replayed embeddings and the
            random generators' state before it ran.
        """
        device = self.state.device if isinstance(self.state.device, torch.device) else None
        runs, per_part = [], []
        with torch.no_grad():
            for part in parts:
                replay = _ReplayedEmbeddings(self.method, self.embedding_cache)
                rng = _RngState(device)
                runs.append((replay, rng))
                per_part.append(self.training_outputs(take_slices(batch, part, num_slices), embedding_cache=replay))
        shared = self._shared_outputs()
        sliced = {
            k for k, v in per_part[0].items()
            if k not in shared and isinstance(v, torch.Tensor) and v.ndim > 0
            and all(isinstance(o[k], torch.Tensor) and o[k].ndim > 0 and o[k].shape[0] == p.stop - p.start
                    for o, p in zip(per_part, parts))
        }
        outputs = {}
        for k, v in per_part[0].items():
            value = torch.cat([o[k] for o in per_part]) if k in sliced else v
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value = value.detach().requires_grad_(True)
            outputs[k] = value
        return outputs, sliced, runs

    def _backward_slice_batches(self, batch: Mapping, parts: Sequence[slice], num_slices: int, outputs: dict,
                                sliced: set, runs: list) -> None:
        """Pass 2 of a split step: each slice batch run again with a graph (its embeddings and random draws
        replayed) and back-propagated with its rows of the loss's gradient with respect to ``outputs`` (a shared
        output's gradient once, with the first slice batch); DDP synchronises the gradients after the last."""
        after = _RngState(self.state.device if isinstance(self.state.device, torch.device) else None)
        no_sync = getattr(self.network, "no_sync", None)
        device_type = self.state.device.type if hasattr(self.state.device, "type") else "cpu"
        for i, (part, (replay, rng)) in enumerate(zip(parts, runs)):
            rng.restore()
            last = i == len(parts) - 1
            with (contextlib.nullcontext() if last or no_sync is None else no_sync()), \
                    torch.autocast(device_type, enabled=bool(self.amp)):
                chunk = self.training_outputs(take_slices(batch, part, num_slices), embedding_cache=replay)
                tensors, grads = [], []
                for k, leaf in outputs.items():
                    if not isinstance(leaf, torch.Tensor) or leaf.grad is None or k not in chunk:
                        continue
                    if k not in sliced and i > 0:
                        continue
                    value = chunk[k]
                    if isinstance(value, torch.Tensor) and value.requires_grad:
                        tensors.append(value)
                        grads.append(leaf.grad[part] if k in sliced else leaf.grad)
            if tensors:
                torch.autograd.backward(tensors, grads)
            del chunk, tensors, grads
        after.restore()

    def _iteration(self, engine: MultiRaterTrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        engine.state.output = {Keys.IMAGE: batch["image"], Keys.LABEL: self.target(batch)}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        num_slices = int(batch["image"].shape[0])
        parts = slice_batches(num_slices, self.slice_batch_size)
        split = len(parts) > 1
        with torch.autocast(engine.state.device.type if hasattr(engine.state.device, "type") else "cpu",
                            enabled=bool(engine.amp)):
            if split:
                outputs, sliced, runs = self._gradient_free_outputs(batch, parts, num_slices)
            else:
                outputs = self.training_outputs(batch)
            engine.state.output[Keys.PRED] = outputs[self.prediction_key]
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = self.compute_loss(outputs, batch)
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        scaled = engine.scaler.scale(loss) if engine.amp and engine.scaler is not None else loss
        scaled.backward()  # split: the gradient with respect to the outputs only
        if split:
            self._backward_slice_batches(batch, parts, num_slices, outputs, sliced, runs)
            del outputs, runs
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if engine.amp and engine.scaler is not None:
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            engine.optimizer.step()
        components = getattr(self.loss_function, "components", None)
        if callable(components):  # e.g. BCE, Dice and KL parts, for the logs
            engine.state.output.update({f"loss_{k}": float(v) for k, v in components().items()})
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # decollates the output when decollate=True
        return engine.state.output
