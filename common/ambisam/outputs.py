"""The case writer: one case's sampling outputs in the input's own geometry (:func:`write_case_outputs`).

The NIfTI primitive, :func:`~ambisam.io.write_nifti`, lives in :mod:`ambisam.io` (re-exported here) so that the data
package can write volumes without importing the inferers and networks.

Per case ``<id>``: ``<id>_mask.nii.gz`` (the final mask, uint8), ``<id>_mean.nii.gz`` (mean probability),
``<id>_uncertainty.nii.gz`` (entropy of the mean, bits), ``<id>_variance.nii.gz``, ``<id>_samples.nii.gz`` (the N
samples, one 4D file, samples last) and ``<id>.json`` (what was run). Every file is written under a temporary
name and renamed when complete.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ambisam.inferers.layout import OUTPUT_SUFFIXES
from ambisam.io import write_json, write_nifti  # write_nifti re-exported: the writer of every NIfTI file

__all__ = ["write_nifti", "write_case_outputs", "OUTPUT_SUFFIXES"]


def write_case_outputs(
    out_dir: str | os.PathLike,
    case_id: str,
    maps: dict[str, torch.Tensor],
    affine: np.ndarray | torch.Tensor,
    record: dict | None = None,
    sample_names: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write one case's maps and samples as NIfTI, plus its JSON record.

    Args:
        out_dir: the output folder.
        case_id: the case's id (file name stem).
        maps: the case's split sampling output (:func:`ambisam.inferers.split_sampling_output` or
            :class:`ambisam.data.SplitSamplingOutputd`): ``pred``, ``mean``, ``uncertainty``, ``variance``, each
            ``(S, H, W, D)`` for ``S`` structures (written 3D for one, with the structures last for several),
            and ``samples (S * N, H, W, D)`` (one 4D file, samples last, structure-major).
        affine: the input's 4x4 affine, so the outputs overlay the input.
        record: what was run (bundle/method, backbone, N, seed, timings), written as ``<id>.json``.
        sample_names: a name per sample (``N`` of them, one structure): each sample is also written on its own as
            ``<id>_<name>.nii.gz`` (e.g. a rater-conditioned method's ``rater-<name>``, one mask per rater).

    Returns:
        Output name -> written path (``"record"`` for the JSON; ``sample:<name>`` for the named samples).

    Raises:
        ValueError: ``sample_names`` does not name every sample once, or the output has several structures.
    """
    out_dir = Path(out_dir)
    affine = np.asarray(affine.cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    paths = {}
    for name, suffix in OUTPUT_SUFFIXES.items():
        arr = torch.as_tensor(maps[name]).detach().cpu().numpy()
        if name in ("pred", "samples"):
            arr = arr.astype(np.uint8)
        else:
            arr = arr.astype(np.float32)
        # channels first in memory, last in NIfTI: (C, H, W, D) -> (H, W, D[, C])
        arr = arr[0] if arr.shape[0] == 1 and name != "samples" else np.moveaxis(arr, 0, -1)
        paths[name] = write_nifti(out_dir / f"{case_id}{suffix}", arr, affine)
    if sample_names is not None:
        samples = torch.as_tensor(maps["samples"]).detach().cpu().numpy().astype(np.uint8)
        names = [str(n) for n in sample_names]
        if len(names) != samples.shape[0] or len(set(names)) != len(names) or int(maps["mean"].shape[0]) != 1:
            raise ValueError(f"sample_names must name each of the {samples.shape[0]} samples of one structure once, "
                             f"got {names}")
        for index, name in enumerate(names):
            paths[f"sample:{name}"] = write_nifti(out_dir / f"{case_id}_{name}.nii.gz", samples[index], affine)
    rec = dict(record or {})
    structures = int(maps["mean"].shape[0])
    rec.update(case=case_id, num_samples=int(maps["samples"].shape[0]) // structures, num_structures=structures,
               files={k: p.name for k, p in paths.items()})
    paths["record"] = write_json(out_dir / f"{case_id}.json", rec)
    return paths
