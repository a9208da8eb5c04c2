"""The region form of the sampling output (only the prompted slab, ``region_output``): the same values as the dense
output, background outside, the same written files, streamed without a full volume; the split, the writer, Invertd
and the MONAI Label summary take it."""

from __future__ import annotations

import gzip
import importlib.util
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, decollate_batch
from monai.transforms import Invertd

from ambisam.data import SplitSamplingOutputd, volume_transforms
from ambisam.inferers import SlicewiseSamplingInferer, dense, is_region, region_planes, sampling_region
from ambisam.inferers.layout import OUTPUT_SUFFIXES
from ambisam.io import write_nifti, write_nifti_planes
from ambisam.outputs import write_case_outputs
from test_inferer import CoinFlipNetwork

ROOT = Path(__file__).resolve().parents[1]
AFFINE = np.array([[-0.8, 0, 0, 40.0], [0, 0, 2.5, -12.0], [0, -0.9, 0, 7.0], [0, 0, 0, 1]])


@pytest.fixture
def sam(litemedsam, monkeypatch):
    """LiteMedSAM whose encoder returns zeros at once: the stand-in method ignores the embedding, and the tests
    check where the values go, not what the encoder sees."""
    monkeypatch.setattr(litemedsam, "encode", lambda images: images.new_zeros(images.shape[0], 1, 1, 1))
    return litemedsam


def _case(depth=20, slices=(8, 9)):
    vol = torch.zeros(1, 1, 32, 32, depth)
    box = -torch.ones(1, depth, 4)
    for k in slices:
        vol[0, 0, 8:24, 8:24, k] = 0.5 + 0.1 * k
        box[0, k] = torch.tensor([8.0, 8.0, 23.0, 23.0])
    return vol, box


def _both(sam, probabilities=False, n=4, **case):
    """The dense and the region output of the same draws."""
    vol, box = _case(**case)
    out = {}
    for region in (False, True):
        torch.manual_seed(0)
        inferer = SlicewiseSamplingInferer(num_samples=n, keep_probabilities=probabilities, region_output=region)
        out[region] = inferer(vol, CoinFlipNetwork(sam), box=box)
    return out[False], out[True]


def _old_writer(out_dir, case_id, maps, affine):
    """The writer as it was before regions: each output built whole, cast, channels moved last, ``write_nifti``."""
    for name, suffix in OUTPUT_SUFFIXES.items():
        arr = torch.as_tensor(maps[name]).numpy().astype(np.uint8 if name in ("pred", "samples") else np.float32)
        arr = arr[0] if arr.shape[0] == 1 and name != "samples" else np.moveaxis(arr, 0, -1)
        write_nifti(Path(out_dir) / f"{case_id}{suffix}", arr, affine)


def _contents(path):
    return gzip.decompress(Path(path).read_bytes())


def test_region_is_the_dense_slab_and_zero_outside(sam):
    full, region = _both(sam, probabilities=True)
    assert is_region(region) and region["values"].shape == (1, 3 + 2 * 4, 32, 32, 2)
    assert region["start"].tolist() == [[0, 0, 8]] and region["shape"].tolist() == [[32, 32, 20]]
    assert torch.equal(region["values"], full[..., 8:10])
    assert torch.count_nonzero(full[..., :8]) == 0 and torch.count_nonzero(full[..., 10:]) == 0  # background
    assert region["values"][:, 3:].any()  # something sampled
    (item,) = decollate_batch({"pred": region})  # as the evaluator decollates pred
    assert item["pred"]["start"].tolist() == [0, 0, 8] and torch.equal(dense(item["pred"]), full[0])
    vol, box = _case(slices=())
    empty = SlicewiseSamplingInferer(num_samples=2, region_output=True)(vol, CoinFlipNetwork(sam), box=box)
    assert empty["values"].shape[-1] == 0 and torch.count_nonzero(dense(decollate_batch(empty)[0])) == 0


def test_region_split_and_writer_give_the_files_the_dense_path_wrote(sam, tmp_path):
    full, region = _both(sam)
    dense_maps = SplitSamplingOutputd(num_samples=4)({"pred": full[0]})
    (case,) = decollate_batch(region)
    region_maps = SplitSamplingOutputd(num_samples=4)({"pred": case})
    assert region_maps["samples"]["values"].dtype == region_maps["pred"]["values"].dtype == torch.uint8
    assert region_maps["mean"]["values"].dtype == torch.float32 and region_maps["samples"]["values"].shape[-1] == 2
    for name in OUTPUT_SUFFIXES:
        assert torch.equal(dense(region_maps[name], torch.float32), dense_maps[name].float()), name
    _old_writer(tmp_path / "old", "c", dense_maps, AFFINE)
    write_case_outputs(tmp_path / "dense", "c", dense_maps, AFFINE, sample_names=["a", "b", "c", "d"])
    write_case_outputs(tmp_path / "region", "c", region_maps, AFFINE, sample_names=["a", "b", "c", "d"])
    for name, suffix in OUTPUT_SUFFIXES.items():
        old = tmp_path / "old" / f"c{suffix}"
        for new in (tmp_path / "dense" / f"c{suffix}", tmp_path / "region" / f"c{suffix}"):
            assert _contents(new) == _contents(old), (name, new)  # header and voxels, byte for byte
        arr = np.asarray(nib.load(old).dataobj)
        assert arr.dtype == (np.uint8 if name in ("pred", "samples") else np.float32)
        assert np.count_nonzero(arr[:, :, :8]) == np.count_nonzero(arr[:, :, 10:]) == 0, name
    for i, name in enumerate("abcd"):
        one = np.asarray(nib.load(tmp_path / "region" / f"c_{name}.nii.gz").dataobj)
        assert one.dtype == np.uint8 and np.array_equal(one, dense_maps["samples"][i].numpy().astype(np.uint8))
        assert _contents(tmp_path / "region" / f"c_{name}.nii.gz") == _contents(tmp_path / "dense" / f"c_{name}.nii.gz")


def test_planes_are_one_slice_in_the_files_dtype():
    values = torch.rand(3, 6, 5, 2)
    region = sampling_region(values, [0, 0, 4], [6, 5, 9])
    planes = list(region_planes(region, np.uint8))
    assert len(planes) == 3 * 9 and all(p.shape == (6, 5) and p.dtype == np.uint8 for p in planes)
    assert all(not p.any() for k, p in enumerate(planes) if k % 9 not in (4, 5))
    floats = list(region_planes(region, np.float32))
    assert np.array_equal(floats[9 + 5], values[1, :, :, 1].numpy()) and floats[0].dtype == np.float32
    with pytest.raises(ValueError, match="does not fit"):
        sampling_region(values, [0, 0, 8], [6, 5, 9])


def test_streamed_file_errors_name_the_file_and_leave_nothing(tmp_path):
    path = tmp_path / "x.nii.gz"
    with pytest.raises(ValueError, match=f"{path}: 1 planes given"):
        write_nifti_planes(path, (4, 3, 2), np.uint8, np.eye(4), [np.zeros((4, 3), np.uint8)])
    with pytest.raises(ValueError, match="float32"):
        write_nifti_planes(path, (4, 3, 1), np.uint8, np.eye(4), [np.zeros((4, 3), np.float32)])
    assert list(tmp_path.iterdir()) == []


def test_a_2d_region_is_the_whole_image(sam):
    image = torch.zeros(1, 1, 32, 32)
    image[0, 0, 8:24, 8:24] = 0.7
    box = torch.tensor([[8.0, 8.0, 23.0, 23.0]])
    torch.manual_seed(0)
    full = SlicewiseSamplingInferer(num_samples=3)(image, CoinFlipNetwork(sam), box=box)
    torch.manual_seed(0)
    region = SlicewiseSamplingInferer(num_samples=3, region_output=True)(image, CoinFlipNetwork(sam), box=box)
    assert region["start"].tolist() == [[0, 0]] and torch.equal(region["values"], full)


def test_invertd_of_the_region_split_densely_equals_the_dense_path(tmp_path):
    shape = (12, 10, 5)
    vol = np.random.default_rng(0).normal(-500, 300, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, AFFINE), str(tmp_path / "vol.nii.gz"))
    pre = volume_transforms(orientation="RAS", spacing=(1.5, 1.5, 1.5))
    img = pre({"image": str(tmp_path / "vol.nii.gz")})["image"]
    depth = img.shape[-1]
    k0, k1 = 1, depth - 1
    slab = torch.rand(3 + 3, *img.shape[1:3], k1 - k0, generator=torch.Generator().manual_seed(0))
    slab[3:] = (slab[3:] > 0.5).float()
    slab[0] = slab[3:].mean(0)
    region = sampling_region(MetaTensor(slab, meta=img.meta), [0, 0, k0], img.shape[1:])
    keys = ["pred", "mean", "uncertainty", "variance", "samples"]
    inv = Invertd(keys=keys, transform=pre, orig_keys="image", nearest_interp=[True, False, False, False, True])
    outs = []
    for pred, split in ((MetaTensor(dense(region), meta=img.meta), SplitSamplingOutputd(num_samples=3)),
                        (region, SplitSamplingOutputd(num_samples=3, dense=True))):
        d = pre({"image": str(tmp_path / "vol.nii.gz")})
        d["pred"] = pred
        outs.append(inv(split(d)))
    for k in keys:
        assert outs[1][k].shape[1:] == shape and outs[1][k].dtype == torch.float32, k
        assert np.allclose(outs[1][k].affine.numpy(), AFFINE, atol=1e-5), k
        assert torch.equal(outs[0][k].as_tensor(), outs[1][k].as_tensor()), k


def _app_infers(monkeypatch):
    """The app's ``lib.infers``; where MONAI Label is not installed, on stand-ins for the three names it imports
    from it (the summary does not use them)."""
    if importlib.util.find_spec("monailabel") is None:
        for name, attrs in {
            "monailabel": {}, "monailabel.interfaces": {}, "monailabel.interfaces.tasks": {},
            "monailabel.interfaces.tasks.infer_v2": {"InferType": type("InferType", (), {})},
            "monailabel.tasks": {}, "monailabel.tasks.infer": {},
            "monailabel.tasks.infer.bundle": {"BundleInferTask": type("BundleInferTask", (), {})},
            "monailabel.utils": {}, "monailabel.utils.others": {},
            "monailabel.utils.others.class_utils": {"unload_module": lambda name: None},
        }.items():
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.syspath_prepend(str(ROOT / "apps" / "monailabel"))
    for name in ("lib", "lib.infers", "lib.prompts"):  # imported afresh, and forgotten after the test
        monkeypatch.setitem(sys.modules, name, None)
        del sys.modules[name]
    return importlib.import_module("lib.infers")


def test_monailabel_summary_of_a_region_is_the_dense_summary(sam, monkeypatch):
    sampling_summary = _app_infers(monkeypatch).sampling_summary
    full, region = _both(sam)
    dense_maps = SplitSamplingOutputd(num_samples=4)({"pred": full[0]})
    region_maps = SplitSamplingOutputd(num_samples=4)({"pred": decollate_batch(region)[0]})
    summary = sampling_summary(region_maps)
    assert summary == sampling_summary(dense_maps) and summary["predicted_region_voxels"] > 0


def test_the_memory_bench_case_is_a_ct_with_a_box_over_a_few_slices(tmp_path):
    from ambisam.bench_memory import format_memory, write_memory_case
    from ambisam.data import inference_items

    image, box = write_memory_case(tmp_path, size=32, slices=10, box_slices=2)
    d = volume_transforms(box=True)(inference_items(image=image, box=box)[0])
    assert d["image"].shape == (1, 32, 32, 10)
    assert [k for k in range(10) if (d["box"][k] >= 0).all()] == [4, 5]  # the prompted slices
    line = format_memory({"bundle": "psam", "shape": [32, 32, 10], "box_slices": 2, "num_samples": 4,
                          "peak_rss_mib": 2048.0, "seconds": 3.0, "output_mib": 1.0})
    assert "peak RSS 2.00 GiB" in line and "32x32x10" in line
