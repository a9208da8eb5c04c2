"""The ambisam MONAI Label app: every bundle in ``bundles/`` served by name.

    monailabel start_server --app apps/monailabel --studies DIR --conf models psam,seqsam

``--conf`` keys (all optional):

- ``models``: comma-separated bundle names, or ``all`` (default: every bundle in the bundles folder);
- ``bundles``: the folder of bundles (default: the repository's ``bundles/``);
- ``weights``: a folder with ``<name>/model.pt`` or ``<name>.pt`` per bundle (default: each bundle's own
  ``models/model.pt``); a bundle with no weights is trainable but not served for inference;
- ``label_name``: the foreground label's name shown by clients (default ``lesion``);
- ``point_box_half_size``: half the side of the box put around a single foreground click (default 10 voxels);
- ``scoring_num_samples``: N for active-learning scores (default: each bundle's own);
- ``skip_trainers``: ``true`` to offer no training.

Per bundle it registers an infer task (:class:`~lib.infers.SamplingBundleInferTask`), a trainer for a
frozen-encoder bundle (:class:`~lib.trainers.FrozenEncoderBundleTrainTask`) and the active-learning strategy
``<name>_disagreement`` (:class:`~lib.activelearning.SampleDisagreement`). An inference on a datastore image
stores the uncertainty map and the samples as that image's labels with the tags ``<name>_uncertainty`` and
``<name>_samples``; the result JSON says where to download them (``GET /datastore/label?label=ID&tag=TAG``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import quote

import monailabel
from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import strtobool

import ambisam
from ambisam.errors import find_input_error
from ambisam.registry import method_registry

from lib.activelearning import DisagreementScorer, SampleDisagreement
from lib.bundles import default_bundles_dir, find_weights, make_working_copy, selected_bundles
from lib.infers import EXTRA_OUTPUTS, OUTPUT_FILES_KEY, SamplingBundleInferTask
from lib.trainers import FrozenEncoderBundleTrainTask

logger = logging.getLogger(__name__)


def _answer_params_that_are_not_a_json_object_with_400() -> None:
    """MONAI Label 0.8.5 reads an infer request's ``params`` form field with ``json.loads`` in its endpoint
    (``monailabel.endpoints.infer.run_inference``), before the app sees the request: malformed JSON, or JSON
    that is not an object, ends in a bare 500. Wrap that function (its route calls it by name) so that such a
    request is a 400 saying what is wrong; the request itself goes on unchanged."""
    import json

    from monailabel.endpoints import infer as endpoint

    run = endpoint.run_inference
    if getattr(run, "_ambisam", False):
        return

    def run_inference(background_tasks, model, image="", session_id="", params="{}", *args, **kwargs):
        if isinstance(params, str) and params:
            try:
                parsed = json.loads(params)
            except json.JSONDecodeError as e:
                raise HTTPException(status_code=400, detail=f"ambisam: error: the request's params are not JSON "
                                                             f"({e})") from None
            if not isinstance(parsed, dict):
                raise HTTPException(status_code=400, detail="ambisam: error: the request's params must be a JSON "
                                                             f"object, got {type(parsed).__name__}")
        return run(background_tasks, model, image, session_id, params, *args, **kwargs)

    run_inference._ambisam = True  # type: ignore[attr-defined]
    endpoint.run_inference = run_inference


class AmbisamApp(MONAILabelApp):
    """Serve the ambisam bundles: inference with uncertainty, training, active learning by sample disagreement.

    Args:
        app_dir: this folder.
        studies: the datastore (a folder of images, or a DICOMweb URL).
        conf: the ``--conf`` pairs (see the module docstring).

    Raises:
        InputError: an unknown bundle name, or a missing bundles or weights folder.
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        _answer_params_that_are_not_a_json_object_with_400()
        conf = dict(conf or {})
        self.bundles_dir = Path(conf.get("bundles") or default_bundles_dir(app_dir)).resolve()
        self.sources = selected_bundles(conf, self.bundles_dir)
        weights_dir = conf.get("weights")
        self.working_copies: dict[str, Path] = {}
        self.has_weights: dict[str, bool] = {}
        for name, source in self.sources.items():
            weights = find_weights(name, source, weights_dir)
            self.working_copies[name] = make_working_copy(source, Path(app_dir) / "model" / name, weights)
            self.has_weights[name] = (self.working_copies[name] / "models" / "model.pt").is_file()
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"ambisam bundles ({', '.join(self.sources)})",
            description="Ambiguity-aware segmentation: N plausible masks, their uncertainty, active learning by "
            "sample disagreement",
            version=f"ambisam {ambisam.__version__}, MONAI Label {monailabel.__version__}",
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, path in self.working_copies.items():
            spec = method_registry.get(name)
            if spec is not None and spec.multi_organ:
                logger.warning(f"{name}: a multi-organ bundle (organs as labels, a box per organ); serving it through "
                               "MONAI Label is not implemented yet: not served for inference")
                continue
            if not self.has_weights[name]:
                logger.warning(
                    f"{name}: no trained weights (give --conf weights DIR, or train it: POST /train/{name}); "
                    "not served for inference"
                )
                continue
            task = SamplingBundleInferTask(
                str(path),
                self.conf,
                label_name=self.conf.get("label_name", "lesion"),
                point_box_half_size=int(self.conf.get("point_box_half_size", 10)),
            )
            if task.is_valid():
                logger.info(f"+++ Adding Inferer:: {name} => {task.type}, N = {task.default_num_samples}")
                infers[name] = task
        return infers

    def _encoder_frozen(self, name: str) -> bool:
        task = self._infers.get(name) if hasattr(self, "_infers") else None
        if task is not None:
            return bool(task.encoder_frozen)
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(self.working_copies[name] / "configs" / "inference.json"))
        parser.config["bundle_root"] = str(self.working_copies[name])
        network = parser.get_parsed_content("network_def")
        return bool(getattr(network, "encoder_frozen", False))

    def init_trainers(self) -> dict[str, TrainTask]:
        trainers: dict[str, TrainTask] = {}
        if strtobool(self.conf.get("skip_trainers", "false")):
            return trainers
        for name, path in self.working_copies.items():
            if not (path / "configs" / "train.json").is_file():
                continue
            spec = method_registry.get(name)
            if spec is not None and not spec.trainable:
                logger.info(f"{name}: training-free for SAM (its train.json trains no segmentation model); training "
                            "from MONAI Label is not offered")
                continue
            if not self._encoder_frozen(name):
                logger.info(f"{name}: the image encoder is trained too; training from MONAI Label is not offered")
                continue
            if spec is not None and "rater_id" in spec.capabilities.conditions:
                logger.info(f"{name}: trains on raters by identity, and the datastore's labels name no rater; "
                            "training from MONAI Label is not offered (train it on a datalist with its raters)")
                continue
            task = FrozenEncoderBundleTrainTask(str(path), self.conf)
            if task.is_valid():
                logger.info(f"+++ Adding Trainer:: {name}")
                trainers[name] = task
        return trainers

    def init_strategies(self) -> dict[str, Strategy]:
        strategies: dict[str, Strategy] = {"random": Random()}
        num_samples = self.conf.get("scoring_num_samples")
        for name, task in self._infers.items():
            scorer = DisagreementScorer(task, int(num_samples) if num_samples else None)
            strategies[f"{name}_disagreement"] = SampleDisagreement(scorer)
        logger.info(f"Active Learning Strategies:: {list(strategies)}")
        return strategies

    def infer(self, request, datastore=None):
        """MONAI Label's inference, plus: the uncertainty map and the samples stored as the image's labels
        (tags ``<model>_uncertainty``, ``<model>_samples``) and named in the result JSON's ``outputs``; bad
        input answered as HTTP 400 with its one-line message, an unknown bundle or image as 404."""
        model, image_id = request.get("model"), request.get("image")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"ambisam: error: unknown bundle {model!r}; this server "
                                                         f"serves {sorted(self._infers)}")
        store = datastore if datastore else self.datastore()
        if isinstance(image_id, str) and not os.path.exists(image_id) and not self._in_datastore(store, image_id):
            raise HTTPException(status_code=404, detail=f"ambisam: error: no image {image_id!r} in the datastore")
        try:
            result = super().infer(request, datastore)
        except Exception as e:
            bad = find_input_error(e)
            if bad is None:
                raise
            raise HTTPException(status_code=400, detail=f"ambisam: error: {bad}") from None
        params = result.get("params")
        if not isinstance(params, dict):
            return result
        files = params.pop(OUTPUT_FILES_KEY, {}) or {}
        in_store = isinstance(image_id, str) and not os.path.exists(image_id) and self._in_datastore(store, image_id)
        outputs = {}
        for name in EXTRA_OUTPUTS:
            path = files.get(name)
            if not path or not os.path.exists(path):
                continue
            try:
                if in_store:
                    tag = f"{model}_{name}"
                    store.save_label(image_id, path, tag, {"model": model, "output": name})
                    outputs[name] = {"tag": tag, "url": f"/datastore/label?label={quote(image_id)}&tag={quote(tag)}"}
            finally:
                os.unlink(path)
        params["outputs"] = outputs
        if not in_store:
            params["outputs_note"] = "the uncertainty map and the samples are stored only for datastore images"
        return result

    @staticmethod
    def _in_datastore(store, image_id: str) -> bool:
        try:
            return bool(store.get_image_uri(image_id))
        except Exception:  # noqa: BLE001 - any datastore's "no such image"
            return False
