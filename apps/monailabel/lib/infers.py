"""MONAI Label inference for every ambisam bundle: MONAI Label's own ``BundleInferTask`` reading the bundle's
``preprocessing``, ``inferer`` and ``postprocessing``, with what a sampling method adds.

- The client's box prompt reaches the bundle (:class:`~lib.prompts.BoxPromptFromRequestd`) and the sampling
  inferer (``box=`` per slice, as the bundle's evaluator passes it).
- The writer is extended, as MONAI Label's vista2d app extends it: besides the final mask (the label the client
  shows), it writes the uncertainty map and the N samples, and returns a small JSON summary: N, the mask's size
  and the mean uncertainty inside it, and the sample disagreement over the predicted region (the active-learning
  score). The app stores the extra maps in the datastore (see ``main.py``).
- The bundles' inferer returns the slab of sampled slices (``region_output``, :mod:`ambisam.inferers.region`) and
  their post-processing splits it into regions of it: the writer streams the files from them and the summary is
  computed on the slab (everything outside it is 0), so a request's memory grows with the prompted region.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import decollate_batch
from monai.transforms import Compose, SaveImaged
from monai.utils import ensure_tuple
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.utils.others.class_utils import unload_module

from ambisam.data import case_id, case_seed
from ambisam.errors import InputError
from ambisam.inferers.layout import OUTPUT_NAMES
from ambisam.inferers.region import dense, region_parts
from ambisam.networks import rater_index
from ambisam.outputs import write_case_outputs

from lib.prompts import BoxPromptFromRequestd

__all__ = ["SamplingBundleInferTask", "sampling_summary", "EXTRA_OUTPUTS", "OUTPUT_FILES_KEY"]

logger = logging.getLogger(__name__)

#: the maps returned beside the final mask (stored in the datastore under the tag ``<bundle>_<name>``)
EXTRA_OUTPUTS = ("uncertainty", "samples")
#: result-JSON key carrying the extra maps' temporary files from the writer to the app (removed by the app)
OUTPUT_FILES_KEY = "_output_files"


def _to_numpy(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)


def _slabs(maps: Mapping[str, Any], names: Sequence[str]) -> list[np.ndarray]:
    """The values of ``maps[name]`` on their common region (the whole volume for dense maps, or when the regions
    differ), as arrays: outside a region every map is 0, so a summary over the slab is the summary over the volume."""
    parts = [region_parts(maps[n]) for n in names]
    if len({(p[1], tuple(p[0].shape[1:])) for p in parts}) != 1:
        return [_to_numpy(dense(maps[n])) for n in names]
    return [_to_numpy(p[0]) for p in parts]


def sampling_summary(maps: Mapping[str, Any]) -> dict[str, Any]:
    """What a client needs to know about one case's samples, small enough for the result JSON.

    Args:
        maps: the split sampling output: ``pred`` and ``uncertainty`` ``(1, *spatial)``, ``samples (N, *spatial)``,
            tensors or regions of them (:mod:`ambisam.inferers.region`; computed on the slab).

    Returns:
        ``num_samples``; ``mask_voxels`` and ``mean_uncertainty_in_mask`` (bits, ``None`` for an empty mask);
        ``predicted_region_voxels`` (voxels that at least one sample marks) and ``sample_disagreement``: the mean
        uncertainty (binary entropy of the samples' mean, bits) over that region, 0 when it is empty; this is the
        active-learning score.
    """
    pred, uncertainty, samples = _slabs(maps, ("pred", "uncertainty", "samples"))
    mask = pred[0] > 0
    uncertainty = uncertainty[0].astype(np.float64)
    samples = samples > 0
    region = samples.any(axis=0)
    return {
        "num_samples": int(samples.shape[0]),
        "mask_voxels": int(mask.sum()),
        "mean_uncertainty_in_mask": float(uncertainty[mask].mean()) if mask.any() else None,
        "predicted_region_voxels": int(region.sum()),
        "sample_disagreement": float(uncertainty[region].mean()) if region.any() else 0.0,
    }


class SamplingBundleInferTask(BundleInferTask):
    """``BundleInferTask`` for an ambisam bundle (box-prompted or prompt-free sampling method).

    A box-prompted method is offered to clients as an interactive model (``deepgrow``: 3D Slicer then shows its
    point and ROI/BBox prompt tools), a prompt-free one as ``segmentation``. ``num_samples`` and ``seed`` appear
    in the client's options (defaults: the bundle's own). A rater-conditioned method (``"rater_id"`` among its
    conditions, e.g. ProSeg) also takes ``rater`` (a rater name of the trained model, or its id: "what would this
    rater draw"; empty: the method's default) and, where the bundle has one, ``mode`` (its inference modes).

    Args:
        path: the bundle's working copy (``configs/``, ``models/model.pt``).
        conf: the app's ``--conf`` pairs.
        label_name: the name of the foreground label shown by clients.
        point_box_half_size: see :func:`lib.prompts.box_from_request`.
        kwargs: passed to ``BundleInferTask``.
    """

    def __init__(
        self,
        path: str,
        conf: Mapping[str, str],
        label_name: str = "lesion",
        point_box_half_size: int = 10,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("post_filter", [SaveImaged])
        kwargs.setdefault("load_strict", True)
        super().__init__(path, dict(conf), add_post_restore=False, **kwargs)
        self.bundle_name = os.path.basename(os.path.normpath(path))
        self._lock = threading.RLock()
        if not self.valid:
            return
        network = self.network
        # a box prompt (the method contract's declaration), or a box placing the region of interest (roi_size)
        roi_size = self.bundle_config.get_parsed_content("roi_size") if "roi_size" in self.bundle_config else None
        self.needs_box = bool(network.capabilities.needs_prompt) or roi_size is not None
        self.encoder_frozen = bool(getattr(network, "encoder_frozen", False))
        self.point_box_half_size = int(point_box_half_size)
        # the sampling inferer processes whole volumes slice by slice: clients treat the model as 3D
        self.type = InferType.DEEPGROW if self.needs_box else InferType.SEGMENTATION
        self.labels = {label_name: 1}
        self.dimension = 3
        self.default_num_samples = int(self.bundle_config.get_parsed_content("num_samples"))
        has_seed = self.bundle_config.get("seed") is not None
        self.default_seed = int(self.bundle_config.get_parsed_content("seed")) if has_seed else 0
        self._config.update({"num_samples": self.default_num_samples, "seed": self.default_seed})
        self.rater_names = tuple(getattr(network, "rater_names", ()) or ())
        self.rater_conditioned = "rater_id" in network.capabilities.conditions
        if self.rater_conditioned:
            self._config["rater"] = ""
        self.modes = tuple(getattr(network, "inference_modes", ()) or ())
        if self.modes and "mode" in self.bundle_config:
            self.default_mode = self.bundle_config.get_parsed_content("mode")
            self._config["mode"] = self.default_mode

    def info(self) -> dict[str, Any]:
        i = super().info()
        i["needs_box"] = self.needs_box
        i["outputs"] = ["label (final mask)", *EXTRA_OUTPUTS]
        return i

    def __call__(self, request, callbacks=None):
        # one request at a time per bundle: the bundle config (N) and torch's seed are set per request
        with self._lock:
            return super().__call__(request, callbacks)

    def _request_settings(self, data: Mapping | None) -> tuple[int, int]:
        data = data or {}
        try:
            num_samples = int(data.get("num_samples", self.default_num_samples))
            seed = int(data.get("seed", self.default_seed))
        except (TypeError, ValueError):
            raise InputError(None, f"num_samples and seed must be whole numbers, got {data.get('num_samples')!r}, "
                                   f"{data.get('seed')!r}") from None
        if num_samples < 1:
            raise InputError(None, f"num_samples must be at least 1, got {num_samples}")
        return num_samples, seed

    def _request_rater(self, data: Mapping | None) -> int | None:
        """The rater id a request asks for (``rater``: a trained rater's name or id), ``None`` for none."""
        rater = (data or {}).get("rater")
        if rater is None or str(rater).strip() == "":
            return None
        if not self.rater_conditioned:
            raise InputError(None, f"bundle {self.bundle_name} is not conditioned on a rater; drop 'rater'")
        return rater_index(self.rater_names, str(rater).strip())

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        num_samples, _ = self._request_settings(data)
        if self.bundle_config.get("num_samples") != num_samples:
            self.bundle_config["num_samples"] = num_samples  # re-parsed: inferer and postprocessing follow
        if self.modes and "mode" in self.bundle_config:
            mode = (data or {}).get("mode") or self.default_mode
            if mode not in self.modes:
                raise InputError(None, f"unknown mode {mode!r}; bundle {self.bundle_name} offers {list(self.modes)}")
            if self.bundle_config.get("mode") != mode:
                self.bundle_config["mode"] = mode
        self._request_rater(data)  # a bad rater fails before any work
        prompt = BoxPromptFromRequestd(self.needs_box, point_box_half_size=self.point_box_half_size)
        return [prompt, *super().pre_transforms(data)]

    def post_transforms(self, data=None) -> Sequence[Callable]:
        # the bundles' postprocessing may be one transform rather than a Compose
        sys.path.insert(0, self.bundle_path)
        unload_module("scripts")
        self._update_device(data)
        post: list = []
        for key in self.const.key_postprocessing():
            if self.bundle_config.get(key):
                parsed = self.bundle_config.get_parsed_content(key, instantiate=True)
                post = list(parsed.transforms) if isinstance(parsed, Compose) else list(ensure_tuple(parsed))
                break
        sys.path.remove(self.bundle_path)
        return self._filter_transforms(post, self.post_filter)

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda"):
        """Sample the pre-processed case: the bundle's inferer with the network and the per-slice boxes."""
        _, seed = self._request_settings(data)
        inferer = self.inferer(data)
        network = self._get_network(device, data)
        image = data[self.input_key]
        inputs = image if torch.is_tensor(image) else torch.as_tensor(image)
        inputs = (inputs[None] if convert_to_batch else inputs).to(torch.device(device))
        box = data.get("box")
        if box is not None:
            box = torch.as_tensor(box)
            box = (box[None] if convert_to_batch else box).to(torch.device(device))
        torch.manual_seed(seed)
        # the case's draws from its own seed (the request's seed and the case id), not from torch's global
        # generator, which concurrent requests share
        seeds = torch.tensor([case_seed(seed, case_id(data))])
        with torch.no_grad():
            outputs = inferer(inputs, network, box=box, rater_id=self._request_rater(data), case_seed=seeds)
        # the case of a batch of one: a tensor's first item, or a region's (a dict of batched tensors)
        data[self.output_label_key] = decollate_batch(outputs, detach=True)[0] if convert_to_batch else outputs
        return data

    def writer(self, data: dict[str, Any], extension=None, dtype=None) -> tuple[Any, Any]:
        """Write the final mask (returned as the label), the uncertainty map and the samples, in the input's
        geometry; return the mask's path and the summary JSON (the extra files under ``OUTPUT_FILES_KEY``)."""
        maps = {k: data[k] for k in OUTPUT_NAMES}
        image = data[self.input_key]
        num_samples, seed = self._request_settings(data)
        stem = f"ambisam_{self.bundle_name}_{uuid.uuid4().hex[:12]}"
        paths = write_case_outputs(Path(tempfile.gettempdir()), stem, maps, image.affine)
        for name in ("mean", "variance", "record"):
            paths.pop(name).unlink(missing_ok=True)
        result = {
            "bundle": self.bundle_name,
            "bundle_version": self.version,
            "seed": seed,
            "prompt": data.get("prompt"),
            **({"rater": data.get("rater") or None} if self.rater_conditioned else {}),
            **sampling_summary(maps),
            OUTPUT_FILES_KEY: {name: str(paths[name]) for name in EXTRA_OUTPUTS},
        }
        return str(paths["pred"]), result
