"""Limiting the training list to fewer items, chosen by whole patient (P2SAM's limited-data setting)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ambisam.data import limit_training_items
from ambisam.errors import InputError


def _slices(sizes: dict[str, int]) -> list[dict]:
    """One item per slice, the patients' slices interleaved (so input order is not patient order)."""
    items = []
    for k in range(max(sizes.values())):
        for patient, size in sizes.items():
            if k < size:
                items.append({"id": f"{patient}_slice{k}", "patient": patient, "image": f"{patient}_{k}.nii.gz"})
    return items


ITEMS = _slices({f"patient{i}": 3 + i % 5 for i in range(12)})  # 12 patients, 3 to 7 slices each, 57 items


def _patient_counts(items: list[dict]) -> Counter:
    return Counter(it["patient"] for it in items)


def test_a_count_gives_exactly_that_many_items():
    for count in (1, 5, 17, 40, len(ITEMS)):
        chosen = limit_training_items(ITEMS, count, seed=1)
        assert len(chosen) == count
        assert len({it["id"] for it in chosen}) == count
    assert limit_training_items(ITEMS, np.int64(9)) == limit_training_items(ITEMS, 9)


def test_a_fraction_gives_its_rounded_share_at_least_one():
    assert len(limit_training_items(ITEMS, 0.25)) == round(0.25 * len(ITEMS)) == 14
    assert len(limit_training_items(ITEMS, 0.055)) == round(0.055 * len(ITEMS))  # 3
    assert len(limit_training_items(ITEMS, 0.001)) == 1
    assert len(limit_training_items(ITEMS, 1.0)) == len(ITEMS)


def test_none_keeps_every_item_as_copied_dicts():
    chosen = limit_training_items(ITEMS, None)
    assert chosen == ITEMS and all(a is not b for a, b in zip(chosen, ITEMS))
    chosen[0]["id"] = "changed"
    assert ITEMS[0]["id"] != "changed"


def test_whole_patients_are_taken_except_possibly_the_last():
    sizes = _patient_counts(ITEMS)
    for seed in range(5):
        for count in (4, 11, 23, 30):
            taken = _patient_counts(limit_training_items(ITEMS, count, seed=seed))
            cut = [p for p, n in taken.items() if n < sizes[p]]
            assert len(cut) <= 1
            assert sum(taken.values()) == count


def test_the_patients_come_in_the_shuffled_order():
    """Patients are taken in the order of ``default_rng(seed)`` over the naturally sorted patients."""
    patients = sorted({it["patient"] for it in ITEMS}, key=lambda p: int(p.removeprefix("patient")))
    order = [patients[i] for i in np.random.default_rng(4).permutation(len(patients))]
    sizes = _patient_counts(ITEMS)
    count = sizes[order[0]] + sizes[order[1]] + 1
    taken = _patient_counts(limit_training_items(ITEMS, count, seed=4))
    assert taken == Counter({order[0]: sizes[order[0]], order[1]: sizes[order[1]], order[2]: 1})


def test_the_id_is_the_patient_when_there_is_no_patient_key():
    items = [{"id": f"case{i}"} for i in range(10)]
    chosen = limit_training_items(items, 4, seed=2)
    assert len(chosen) == 4 and all("patient" not in it for it in chosen)


def test_deterministic_for_a_seed_different_for_another():
    first = limit_training_items(ITEMS, 20, seed=7)
    assert first == limit_training_items(ITEMS, 20, seed=7)
    assert any(limit_training_items(ITEMS, 20, seed=s) != first for s in range(8, 12))


def test_items_keep_their_input_order():
    chosen = limit_training_items(ITEMS, 25, seed=3)
    positions = [ITEMS.index(it) for it in chosen]
    assert positions == sorted(positions)


@pytest.mark.parametrize(
    "limit, message",
    [
        (0, "at least 1"),
        (-3, "at least 1"),
        (1.5, r"in \(0, 1\]"),
        (0.0, r"in \(0, 1\]"),
        (-0.2, r"in \(0, 1\]"),
        (float("nan"), r"in \(0, 1\]"),
        (True, "expected a count"),
        ("500", "expected a count"),
        (len(ITEMS) + 1, f"there are only {len(ITEMS)}"),
    ],
)
def test_bad_limits_are_clear_errors(limit, message):
    with pytest.raises(InputError, match=message) as err:
        limit_training_items(ITEMS, limit)
    assert err.value.path is None


def test_no_items():
    assert limit_training_items([], None) == []
    with pytest.raises(InputError, match="there are only 0"):
        limit_training_items([], 0.5)
