"""Active learning by the bundles' own sample disagreement.

The next image to label is the unlabelled image on which a bundle's N samples disagree most: the mean
uncertainty (binary entropy of the samples' mean, in bits) over the predicted region, i.e. the voxels that at
least one sample marks (:func:`lib.infers.sampling_summary`). An image where every sample draws the same mask
scores 0; one where half the samples see a lesion that the other half miss scores near 1.

Scores are kept in the datastore's image info (``ambisam_disagreement`` -> bundle -> score, N, the prompt, the
weights' time stamp) and recomputed only when the served weights change, so a strategy call scores at most
``max_new_scores`` images it has not seen. Box-prompted methods are prompted with the image info's ``box``
(``PUT /datastore/image/info``, ``{"box": [i_min, j_min, k_min, i_max, j_max, k_max]}``) when there is one, else
with the whole image.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.infers import SamplingBundleInferTask, sampling_summary
from lib.prompts import image_spatial_shape

__all__ = ["DisagreementScorer", "SampleDisagreement", "INFO_KEY"]

logger = logging.getLogger(__name__)

#: the datastore image-info key holding the scores
INFO_KEY = "ambisam_disagreement"


class DisagreementScorer:
    """Score images by one bundle's sample disagreement, cached in the datastore.

    Args:
        task: the bundle's infer task.
        num_samples: N used for scoring (``None``: the bundle's own).
    """

    def __init__(self, task: SamplingBundleInferTask, num_samples: int | None = None) -> None:
        self.task = task
        self.num_samples = num_samples

    def weights_stamp(self) -> float:
        """The served weights' modification time (scores made with other weights are stale)."""
        path = self.task.get_path()
        return os.stat(path).st_mtime if path else 0.0

    def cached(self, image_id: str, datastore: Datastore) -> dict | None:
        """The image's cached score record for this bundle, if it was made with the served weights."""
        record = (datastore.get_image_info(image_id).get(INFO_KEY) or {}).get(self.task.bundle_name)
        if record and record.get("weights_mtime") == self.weights_stamp():
            return record
        return None

    def _prompt(self, image_id: str, uri: str, datastore: Datastore) -> list[int] | None:
        if not self.task.needs_box:
            return None
        box = datastore.get_image_info(image_id).get("box")
        if box:
            return list(box)
        shape = image_spatial_shape(uri)
        if shape is None:
            from monai.transforms import LoadImage

            shape = tuple(LoadImage(image_only=True, ensure_channel_first=True)(uri).shape[1:4])
        return [0, 0, 0, *(int(s) - 1 for s in shape[:3])]

    def score(self, image_id: str, datastore: Datastore) -> dict:
        """Score one image (from the cache when it is fresh) and cache the result.

        Returns:
            ``{"score", "num_samples", "box", "weights_mtime", ...}`` (see :func:`lib.infers.sampling_summary`).
        """
        found = self.cached(image_id, datastore)
        if found is not None:
            return found
        uri = datastore.get_image_uri(image_id)
        request: dict[str, Any] = {"image": uri, "skip_writer": True, "logging": "WARNING"}
        box = self._prompt(image_id, uri, datastore)
        if box is not None:
            request["box"] = box
        if self.num_samples:
            request["num_samples"] = int(self.num_samples)
        _, data = self.task(request)
        summary = sampling_summary(data)
        record = {
            "score": summary["sample_disagreement"],
            "num_samples": summary["num_samples"],
            "predicted_region_voxels": summary["predicted_region_voxels"],
            "box": box,
            "weights_mtime": self.weights_stamp(),
        }
        scores = dict(datastore.get_image_info(image_id).get(INFO_KEY) or {})
        scores[self.task.bundle_name] = record
        datastore.update_image_info(image_id, {INFO_KEY: scores})
        logger.info(f"{self.task.bundle_name}: sample disagreement of {image_id} = {record['score']:.4f}")
        return record


class SampleDisagreement(Strategy):
    """Next sample: the unlabelled image whose samples disagree most (see the module docstring).

    Args:
        scorer: the bundle's :class:`DisagreementScorer`.
        max_new_scores: images scored anew per call at most (request param ``max_new_scores`` overrides it);
            cached scores are always used.
    """

    def __init__(self, scorer: DisagreementScorer, max_new_scores: int = 20) -> None:
        super().__init__(
            f"{scorer.task.bundle_name}: the unlabelled image whose samples disagree most "
            "(mean entropy over the predicted region)"
        )
        self.scorer = scorer
        self.max_new_scores = int(max_new_scores)

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        images = datastore.get_unlabeled_images()
        if not images:
            return {}
        budget = int(request.get("max_new_scores", self.max_new_scores))
        scores: dict[str, float] = {}
        for image_id in images:
            record = self.scorer.cached(image_id, datastore)
            if record is None and budget > 0:
                record = self.scorer.score(image_id, datastore)
                budget -= 1
            if record is not None:
                scores[image_id] = float(record["score"])
        if not scores:
            return {}
        ranked = sorted(scores, key=lambda i: (-scores[i], i))
        best = ranked[0]
        return {
            "id": best,
            "sample_disagreement": scores[best],
            "bundle": self.scorer.task.bundle_name,
            "ranking": [{"id": i, "sample_disagreement": scores[i]} for i in ranked[:10]],
            "scored": len(scores),
            "unlabelled": len(images),
        }
