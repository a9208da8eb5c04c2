"""One benchmark for every method and the field's baselines, with the same data, split, prompts and metrics
(``python -m ambisam benchmark``; see :mod:`ambisam.benchmark.run`).

Modules, one concept each:

- :mod:`~ambisam.benchmark.budget`: :class:`TimedEmbeddingCache` and :class:`TrainingBudget`, the clocks;
- :mod:`~ambisam.benchmark.recorder`: :class:`EvaluationRecorder`, what an evaluation records beyond metrics;
- :mod:`~ambisam.benchmark.jobs`: one job (one method, one seed), in its own process as
  ``python -m ambisam.benchmark JOB.json``;
- :mod:`~ambisam.benchmark.run`: :func:`run_benchmark` (the jobs, reuse, the intensity convention) and
  :func:`summarize_jobs`;
- :mod:`~ambisam.benchmark.report`: ``results.json``, ``results.md`` and the figures.

Which methods exist, and how each is trained and evaluated, is :mod:`ambisam.registry`'s. Bundle configs and job
overrides name the handlers by their package path (``ambisam.benchmark.TrainingBudget``, ...).
"""

from ambisam.benchmark.budget import TimedEmbeddingCache, TrainingBudget
from ambisam.benchmark.jobs import (
    METRIC_KEYS,
    OPTIONAL_METRIC_KEYS,
    method_availability,
    method_implemented,
    method_kind,
    peak_rss_mb,
    run_job,
)
from ambisam.benchmark.recorder import EvaluationRecorder
from ambisam.benchmark.run import MODALITIES, intensity_convention, run_benchmark, summarize_jobs

__all__ = [
    "METRIC_KEYS",
    "OPTIONAL_METRIC_KEYS",
    "MODALITIES",
    "TimedEmbeddingCache",
    "TrainingBudget",
    "EvaluationRecorder",
    "method_implemented",
    "method_availability",
    "method_kind",
    "intensity_convention",
    "peak_rss_mb",
    "run_job",
    "run_benchmark",
    "summarize_jobs",
]
