"""The cache memory measurement runs and reports what the cache holds (its RSS figures are not asserted)."""

from __future__ import annotations

from ambisam.bench_cache import cache_peak_rss


def test_the_measurement_reports_the_bounded_memory_held():
    held = cache_peak_rss(6, max_memory_mb=8)  # two 4 MiB fake LiteMedSAM embeddings
    assert held["held_mib"] == 8 and held["peak_rss_mib"] >= held["peak_rss_before_mib"] > 0
    on_disk = cache_peak_rss(6, max_memory_mb=8, storage_dtype="float16", on_disk=True)
    assert on_disk["held_mib"] == 8 and on_disk["on_disk"]
