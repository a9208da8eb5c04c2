"""The case writer: one case's sampling outputs in the input's own geometry (:func:`write_case_outputs`).

The NIfTI primitive, :func:`~ambisam.io.write_nifti`, lives in :mod:`ambisam.io` (re-exported here) so that the data
package can write volumes without importing the inferers and networks.

Per case ``<id>``: ``<id>_mask.nii.gz`` (the final mask, uint8), ``<id>_mean.nii.gz`` (mean probability),
``<id>_uncertainty.nii.gz`` (entropy of the mean, bits), ``<id>_variance.nii.gz``, ``<id>_samples.nii.gz`` (the N
samples, one 4D file, samples last) and ``<id>.json`` (what was run). Every file is written under a temporary
name, and a case's files are renamed together once all of them are complete (:func:`~ambisam.io.atomic_group`):
a run that fails or is killed while writing a case leaves none of that case's files.

Each file is streamed plane by plane (:func:`~ambisam.io.write_nifti_planes`) from the case's maps, dense tensors
or regions (:mod:`ambisam.inferers.region`, the inference bundles' form): a plane outside the region is zeros of
the file's dtype, so the writer never builds a full volume, neither in float32 nor in the file's own dtype; the
files are the same bytes :func:`~ambisam.io.write_nifti` writes for the dense arrays.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ambisam.inferers.layout import OPTIONAL_OUTPUT_SUFFIXES, OUTPUT_SUFFIXES
from ambisam.inferers.region import region_parts, region_planes
from ambisam.io import atomic_group, write_json, write_nifti, write_nifti_planes  # write_nifti re-exported

__all__ = ["write_nifti", "write_case_outputs", "write_output_file", "output_dtype", "OUTPUT_SUFFIXES"]

#: the outputs written as ``uint8`` (0/1 masks and the label volume; the others are ``float32``)
_MASKS = ("pred", "samples", "uncertain", "labels")


def output_dtype(name: str) -> np.dtype:
    """The file dtype of an output: ``uint8`` for the masks and labels, ``float32`` for the maps."""
    return np.dtype(np.uint8 if name in _MASKS else np.float32)


def write_output_file(path: str | os.PathLike, output: torch.Tensor | dict, dtype: np.dtype | type,
                      affine: np.ndarray, channels_last: bool) -> Path:
    """Stream one output ``(C, *spatial)`` (dense or a region) to a NIfTI file of ``dtype``.

    Args:
        path: the file.
        output: ``(C, H, W[, D])``, or a region of it (one case).
        dtype: the file's dtype (values are cast plane by plane, as ``astype`` casts the whole array).
        affine: the 4x4 affine.
        channels_last: write ``(H, W[, D], C)``; otherwise ``C`` must be 1 and the file is ``(H, W[, D])``.

    Returns:
        The final path.

    Raises:
        ValueError: ``channels_last`` is false for several channels.
        OSError: writing failed (naming the file).
    """
    values, _, shape = region_parts(output)
    channels = int(values.shape[0])
    if not channels_last and channels != 1:
        raise ValueError(f"{path}: {channels} channels need channels_last")
    file_shape = (*shape, channels) if channels_last else tuple(shape)
    return write_nifti_planes(path, file_shape, dtype, affine, region_planes(output, dtype))


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
            and ``samples (S * N, H, W, D)`` (one 4D file, samples last, structure-major); each a tensor or a
            region of one (:mod:`ambisam.inferers.region`). The optional outputs of
            :data:`~ambisam.inferers.layout.OPTIONAL_OUTPUT_SUFFIXES` (``uncertain``, ``labels``) are written
            when present.
        affine: the input's 4x4 affine, so the outputs overlay the input.
        record: what was run (bundle/method, backbone, N, seed, timings), written as ``<id>.json``.
        sample_names: a name per sample (``N`` of them, one structure): each sample is also written on its own as
            ``<id>_<name>.nii.gz`` (e.g. a rater-conditioned method's ``rater-<name>``, one mask per rater).

    Returns:
        Output name -> written path (``"record"`` for the JSON; ``sample:<name>`` for the named samples).

    Raises:
        ValueError: ``sample_names`` does not name every sample once, or the output has several structures.
        OutputError: a file could not be written, e.g. a full disk (naming it; none of the case's files is left).
    """
    out_dir = Path(out_dir)
    with atomic_group():  # the case's files appear together, or none of them
        affine = np.asarray(affine.cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
        paths = {}
        present = {k: v for k, v in OPTIONAL_OUTPUT_SUFFIXES.items() if k in maps}
        for name, suffix in {**OUTPUT_SUFFIXES, **present}.items():
            # channels first in memory, last in NIfTI: (C, H, W, D) -> (H, W, D[, C])
            channels_last = name == "samples" or int(region_parts(maps[name])[0].shape[0]) != 1
            paths[name] = write_output_file(out_dir / f"{case_id}{suffix}", maps[name], output_dtype(name), affine,
                                            channels_last)
        structures = int(region_parts(maps["mean"])[0].shape[0])
        num_samples = int(region_parts(maps["samples"])[0].shape[0])
        if sample_names is not None:
            names = [str(n) for n in sample_names]
            if len(names) != num_samples or len(set(names)) != len(names) or structures != 1:
                raise ValueError(f"sample_names must name each of the {num_samples} samples of one structure once, "
                                 f"got {names}")
            values, start, shape = region_parts(maps["samples"])
            for index, name in enumerate(names):
                one = {"values": values[index : index + 1], "start": torch.as_tensor(start),
                       "shape": torch.as_tensor(shape)}
                paths[f"sample:{name}"] = write_output_file(out_dir / f"{case_id}_{name}.nii.gz", one,
                                                            output_dtype("samples"), affine, channels_last=False)
        rec = dict(record or {})
        rec.update(case=case_id, num_samples=num_samples // structures, num_structures=structures,
                   files={k: p.name for k, p in paths.items()})
        paths["record"] = write_json(out_dir / f"{case_id}.json", rec)
        return paths
