"""UR-SAM's evaluation table (the layout of the paper's Tables 3-4): Dice per structure for SAM with the prompt box,
the ensemble of augmented boxes, Unc-FPC, Unc-FNC, Unc-FPNC and UR-SAM's rectification, and how well the
uncertainty map finds the errors.

The evaluator samples every case once with ``N = n + 1`` in UR-SAM's ``"given_box_first"`` mode, keeping each
sample's probability map: sample 0 is SAM with the prompt box as given, samples ``1..n`` the augmented boxes, all
from one embedding per slice. :class:`StrategyTableWriter` then scores every strategy from those maps.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_roc_auc
from monai.utils import min_version, optional_import

from ambisam.data.ids import case_id
from ambisam.data.transforms._utils import _as_tensor
from ambisam.data.transforms.rectification import RectifyByUncertaintyd
from ambisam.inferers.layout import binary_entropy
from ambisam.io import write_json, write_text
from ambisam.networks.ursam import box_masks

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

__all__ = ["StrategyTableWriter", "ROW_NAMES", "strategy_table_markdown"]

#: the table's rows: key -> the name printed (the paper's row names)
ROW_NAMES = {
    "prompt": "SAM (prompt box)",
    "ensemble": "Ensemble",
    "unc_fpc": "Unc-FPC",
    "unc_fnc": "Unc-FNC",
    "unc_fpnc": "Unc-FPNC",
    "ursam": "UR-SAM",
}


def _dice(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Dice of two ``(*spatial)`` bool volumes; 1 when both are empty."""
    return float(compute_dice(pred[None, None].float(), label[None, None].float(), ignore_empty=False)[0, 0])


class StrategyTableWriter:
    """Score every strategy per structure and case, and write the table as ``strategies.json``, ``strategies.csv``
    and ``strategies.md`` in ``save_dir`` when the evaluation completes.

    Under ``torch.distributed`` (``multi_gpu_evaluate.json``) every rank scores its own cases; at the end the
    cases are gathered (:func:`torch.distributed.all_gather_object`) and rank 0 writes the table. Cases are averaged
    in the order of their ids, so the table equals one process's on the same data.

    Reads from each decollated case: ``probabilities (S * (n + 1), H, W, D)`` (:class:`~ambisam.data.
    SplitSamplingOutputd` with ``probabilities=True``), ``label (S * K, H, W, D)`` (the raters' union is the
    reference), ``image (1, H, W, D)``, ``box (S, D, 4)`` and ``structures``.

    Args:
        save_dir: the output folder.
        class_map: ``{structure: label value}``.
        num_samples: ``n + 1`` (sample 0 the prompt box).
        prompt: the prompt mode the boxes came from (named in the table).
        alpha_h, threshold: the rectification's settings (:class:`~ambisam.data.RectifyByUncertaintyd`).
        extra: more fields for the JSON (bundle, versions, seed...).
    """

    def __init__(self, save_dir: str, class_map: Mapping[str, int], num_samples: int, prompt: str,
                 alpha_h: float = 1.5, threshold: float | None = None, extra: Mapping[str, Any] | None = None):
        if num_samples < 2:
            raise ValueError(f"the table needs the prompt box and at least one augmented box: num_samples >= 2, "
                             f"got {num_samples}")
        self.save_dir = Path(save_dir)
        self.rectifier = RectifyByUncertaintyd(class_map, alpha_h=alpha_h, threshold=threshold)
        self.num_samples, self.prompt = int(num_samples), prompt
        self.extra = dict(extra or {})
        self.cases: list[dict] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._score_batch)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def score_case(self, item: Mapping[str, Any]) -> dict:
        """Dice per strategy and structure of one case, and the uncertainty's AUROC for UR-SAM's wrong voxels.

        Returns:
            ``{"dice": {row: {structure: float}}, "auroc": {structure: float or None}}``.
        """
        names = list(item["structures"])
        s, n1 = len(names), self.num_samples
        probs = _as_tensor(item["probabilities"]).float()
        probs = probs.reshape(s, n1, *probs.shape[1:])
        label = _as_tensor(item["label"]) != 0
        label = label.reshape(s, -1, *label.shape[1:]).any(dim=1)  # (S, H, W, D): the raters' union
        image = _as_tensor(item["image"])[0].float()
        boxes = torch.as_tensor(item["box"]).float().reshape(s, -1, 4)
        prompted = (boxes >= 0).all(dim=-1)  # (S, D)
        ensemble = probs[:, 1:].mean(dim=1)
        masks = {"prompt": (probs[:, 0] > 0.5) & prompted[:, None, None]}
        for strategy in ROW_NAMES:
            if strategy != "prompt":
                masks[strategy], _ = self.rectifier.strategy_masks(ensemble, image, boxes, 0, strategy)
        dice = {row: {name: _dice(masks[row][t], label[t]) for t, name in enumerate(names)} for row in ROW_NAMES}
        # the voxels SAM was asked about: inside the box of a prompted slice (a -1 row holds no pixel)
        h, w, depth = label.shape[1:]
        inside = box_masks(boxes.reshape(-1, 4), (h, w)).reshape(s, depth, h, w).permute(0, 2, 3, 1)
        auroc = {}
        for t, name in enumerate(names):
            wrong = (masks["ursam"][t] != label[t])[inside[t]]
            auroc[name] = None
            if wrong.any() and not wrong.all():
                u = binary_entropy(ensemble[t])[inside[t]]
                auroc[name] = float(compute_roc_auc(u, wrong.float()))
        return {"case": case_id(item), "dice": dice, "auroc": auroc}

    def _score_batch(self, engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batches = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        for batch, output in zip(batches, outputs):
            self.cases.append(self.score_case({**batch, **output}))

    def table(self, cases: Sequence[Mapping] | None = None) -> dict:
        """The mean over cases per row and structure (a structure a case lacks counts when predicted empty too).

        Args:
            cases: the scored cases (:meth:`score_case`); ``None``: this writer's.
        """
        cases = self.cases if cases is None else cases
        rows = {}
        structures = list(cases[0]["dice"]["prompt"]) if cases else []
        for row in ROW_NAMES:
            values = {name: float(np.mean([c["dice"][row][name] for c in cases])) for name in structures}
            values["mean"] = float(np.mean(list(values.values()))) if values else math.nan
            rows[row] = values
        aurocs = {name: [c["auroc"][name] for c in cases if c["auroc"][name] is not None] for name in structures}
        auroc = {name: (float(np.mean(v)) if v else None) for name, v in aurocs.items()}
        return {"dice": rows, "uncertainty_auroc": auroc, "structures": structures}

    def _all_cases(self) -> list[dict] | None:
        """Every rank's scored cases in the order of their ids; ``None`` on ranks other than 0."""
        cases = list(self.cases)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, cases)
            if dist.get_rank():
                return None
            cases = [c for part in gathered for c in part]
        return sorted(cases, key=lambda c: str(c["case"]))

    def _write(self, _engine=None) -> dict | None:
        cases = self._all_cases()
        if cases is None:
            return None
        result = {"prompt": self.prompt, "num_augmented_boxes": self.num_samples - 1, "cases": len(cases),
                  "case_ids": [c["case"] for c in cases], **self.table(cases), **self.extra}
        self.save_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.save_dir / "strategies.json", result)
        write_text(self.save_dir / "strategies.md", strategy_table_markdown(result))
        write_text(self.save_dir / "strategies.csv", _csv(result))
        return result


def _csv(result: Mapping) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["strategy", *result["structures"], "mean"])
    for row, values in result["dice"].items():
        writer.writerow([row, *(f"{values[c]:.4f}" for c in [*result["structures"], "mean"])])
    return out.getvalue()


def strategy_table_markdown(result: Mapping) -> str:
    """The table as Markdown: rows = strategies, columns = structures, mean last; then the AUROC row.

    Args:
        result: what :class:`StrategyTableWriter` writes as JSON.

    Returns:
        The Markdown text.
    """
    columns: Sequence[str] = [*result["structures"], "mean"]
    lines = [f"Dice per structure, {result['cases']} case(s), prompt: {result['prompt']}, "
             f"{result['num_augmented_boxes']} augmented boxes.", "",
             "| strategy | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row, values in result["dice"].items():
        lines.append(f"| {ROW_NAMES[row]} | " + " | ".join(f"{values[c]:.3f}" for c in columns) + " |")
    auroc = result["uncertainty_auroc"]
    cells = [("-" if auroc[c] is None else f"{auroc[c]:.3f}") for c in result["structures"]]
    lines += ["", "AUROC of the uncertainty map for UR-SAM's wrong voxels (inside the prompted boxes):", "",
              "| | " + " | ".join(result["structures"]) + " |", "|---" * (len(cells) + 1) + "|",
              "| AUROC | " + " | ".join(cells) + " |"]
    return "\n".join(lines) + "\n"
