"""What the benchmark records of an evaluation beyond the metrics: :class:`EvaluationRecorder` (named in job
overrides as ``ambisam.benchmark.EvaluationRecorder``)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from ambisam.benchmark.budget import count_parameters, encoding_seconds
from ambisam.data.ids import case_id
from ambisam.io import write_json

__all__ = ["EvaluationRecorder"]


class EvaluationRecorder:
    """What the benchmark needs from an evaluation beyond the metrics.

    - the sampling inferer's wall time (``ITERATION_STARTED`` to ``FORWARD_COMPLETED``: loading and metrics
      excluded) and the number of prompted slices it sampled;
    - the pooled calibration statistics of the mean prediction against the raters' fraction
      (:func:`~ambisam.metrics.ece_bin_statistics` summed over every test case: the reliability diagram);
    - for the first ``figure_cases`` cases, the slice where the raters' union is largest: image, raters, the
      samples, mean and uncertainty (``<save_dir>/cases/<id>.npz``).

    Time the inferer's embedding cache spends encoding slices for the first time (``clock``) is reported apart
    (``encoding_seconds``) and left out of ``ms_per_sample``, which is then the sampling cost of the method on a
    cached embedding (as ``bench sampling``'s decoder ms per sample).

    Written at completion to ``<save_dir>/recorder.json``. The evaluator's post-processing must split the
    inferer's output (:class:`~ambisam.data.SplitSamplingOutputd`), as every bundle's does.

    Args:
        save_dir: the output folder.
        num_samples: N.
        figure_cases: how many cases to keep for the figures.
        n_bins: calibration bins.
        clock: the inferer's :class:`TimedEmbeddingCache`, or ``None``.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        num_samples: int,
        figure_cases: int = 4,
        n_bins: int = 10,
        clock: Any = None,
    ):
        self.clock = clock
        self.save_dir = Path(save_dir)
        self.num_samples = int(num_samples)
        self.figure_cases = int(figure_cases)
        self.n_bins = int(n_bins)
        self._reset()

    def _reset(self, _engine: Engine | None = None) -> None:
        self.sampling_seconds = 0.0
        self._encoding_start = encoding_seconds(self.clock)
        self.sampled_slices = 0
        self.cases: list[str] = []
        self.bins = np.zeros((3, self.n_bins))
        self._kept: dict[str, dict] = {}
        self._t0 = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._forward_completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _iteration_started(self, _engine: Engine) -> None:
        self._t0 = time.perf_counter()

    def _forward_completed(self, engine: Engine) -> None:
        self.sampling_seconds += time.perf_counter() - self._t0
        batch = engine.state.batch
        box = batch.get("box") if isinstance(batch, Mapping) else None
        if box is not None:
            self.sampled_slices += int((torch.as_tensor(box) >= 0).all(dim=-1).sum())
        elif isinstance(batch, Mapping) and "image" in batch:  # prompt-free: every slice is sampled
            image = batch["image"]
            self.sampled_slices += int(image.shape[0] * (image.shape[-1] if image.ndim == 5 else 1))

    def _collect(self, engine: Engine) -> None:
        from ambisam.figures import lesion_slice
        from ambisam.metrics import ece_bin_statistics

        items = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in items:
            label = _numpy(item["label"]) > 0  # (K, H, W[, D])
            mean = _numpy(item["mean"])[0]
            self.bins += ece_bin_statistics(mean, label, self.n_bins)
            case = case_id(item)
            self.cases.append(case)
            if len(self._kept) < self.figure_cases:
                self._kept[case] = self._figure_slice(item, label, lesion_slice)

    @staticmethod
    def _figure_slice(item: Mapping, label: np.ndarray, lesion_slice) -> dict:
        volume = label.ndim == 4
        k = lesion_slice(label) if volume else 0
        pick = (lambda a: a[..., k]) if volume else (lambda a: a)  # noqa: E731
        return {
            "image": pick(_numpy(item["image"]))[0].astype(np.float32),
            "raters": pick(label).astype(np.uint8),
            "samples": pick(_numpy(item["samples"])).astype(np.uint8),
            "mean": pick(_numpy(item["mean"]))[0].astype(np.float32),
            "uncertainty": pick(_numpy(item["uncertainty"]))[0].astype(np.float32),
            "slice": np.int64(k),
        }

    def _write(self, _engine: Engine) -> None:
        from ambisam.io import atomic_path

        for case, arrays in self._kept.items():
            with atomic_path(self.save_dir / "cases" / f"{case}.npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, **arrays)
        per_sample = self.sampled_slices * self.num_samples
        encoding = encoding_seconds(self.clock) - self._encoding_start
        misses = getattr(self.clock, "misses", None)
        sampling = self.sampling_seconds - encoding
        write_json(
            self.save_dir / "recorder.json",
            {
                "num_samples": self.num_samples,
                "cases": self.cases,
                "figure_cases": list(self._kept),
                "sampling_seconds": sampling,
                "encoding_seconds": encoding,
                "encoded_slices": misses,
                "encoder_ms_per_slice": 1000 * encoding / misses if misses else None,
                "sampled_slices": self.sampled_slices,
                "ms_per_sample": 1000 * sampling / per_sample if per_sample else None,
                "ms_per_slice": 1000 * sampling / self.sampled_slices if self.sampled_slices else None,
                "reliability_bins": self.bins.tolist(),
                "parameters_total": count_parameters(getattr(_engine, "network", None)),
            },
        )


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return (x.as_tensor() if hasattr(x, "as_tensor") else x).detach().cpu().numpy()
    return np.asarray(x)
