"""``bench scale`` end to end at tiny sizes, the slice-batch and dataset-cache config ids, and the byte-bounded
dataset cache (figures and their targets are measured by the command, never asserted here)."""

from __future__ import annotations

import json

import pytest
import torch
from monai.transforms import Compose, Lambdad

from ambisam.data import BoundedCacheDataset, item_bytes

BUNDLES = ("psam", "seqsam", "p2sam", "proseg")


def test_bench_scale_runs_end_to_end_and_reports_each_size(tmp_path):
    from ambisam.bench_scale import bench_scale, format_scale

    # in this process: threads=None keeps the session's torch threads (a set count would stay for every later test)
    result = bench_scale(methods="mcl", sizes=(8, 40), steps=1, warmup=0, data_dir=str(tmp_path), threads=None,
                         default_data=False, isolate=False, embedding_cache_ram_mb=16)
    runs = result["runs"]
    assert [r["slices"] for r in runs] == [8, 40] and [r["volumes"] for r in runs] == [1, 2]
    for r in runs:
        assert r["steps_per_s"] > 0 and r["peak_rss_mib"] > 0 and r["embeddings"] == "synthetic"
        assert r["train_slice_batch_size"] == 2 and r["cache"]["misses"] > 0  # synthetic misses, real cache
    (summary,) = result["methods"]
    assert {"rss_ratio", "throughput_ratio", "rss_flat", "rss_under_limit", "throughput_flat"} <= set(summary)
    assert "| mcl | 64 | 2 |" in format_scale(result) and json.dumps(result)
    assert (tmp_path / "scale" / "datalist_40.json").is_file()


@pytest.mark.parametrize("bundle", BUNDLES)
def test_the_slice_batch_and_dataset_cache_ids_parse_in_every_bundle(bundle):
    from ambisam.bundle import bundle_workflow
    from ambisam.registry import get_method

    spec = get_method(bundle)
    parser = bundle_workflow(spec.config_bundle, spec.stages[-1], "train", **spec.config_overrides()).parser
    # only SeqSAM (and its MCL variant) back-propagates through sequential steps: it trains in slice batches of 2
    assert parser.get_parsed_content("train_slice_batch_size") == (2 if spec.config_bundle == "seqsam" else None)
    assert parser.get_parsed_content("dataset_cache_ram_mb") == 128
    assert parser.get("train#trainer#slice_batch_size") == "@train_slice_batch_size"
    assert parser.get("train#dataset#_target_") == "ambisam.data.BoundedCacheDataset"
    assert parser.get("validate#dataset#max_memory_mb") == "@dataset_cache_ram_mb"


def test_the_dataset_cache_holds_what_its_bound_allows():
    loads = []

    def load(i):
        loads.append(i)
        return torch.zeros(2**18)  # 1 MiB of float32

    items = [{"x": i} for i in range(5)]
    transform = Compose([Lambdad("x", load)])
    bounded = BoundedCacheDataset(items, transform, max_memory_mb=2.5, progress=False)
    assert bounded.item_bytes == 2**20 and bounded.cache_num == 2
    assert item_bytes({"a": [torch.zeros(3)], "b": "text"}) == 12
    loads.clear()
    [bounded[i] for i in range(5)]
    assert loads == [2, 3, 4]  # the uncached ones load each time they are drawn
    assert BoundedCacheDataset(items, transform, progress=False).cache_num == 5  # no bound: CacheDataset
    with pytest.raises(ValueError, match="max_memory_mb"):
        BoundedCacheDataset(items, transform, max_memory_mb=-1)
