"""User inputs for inference and evaluation: the list of cases to run, and checking all of them before
anything is written (bad input stops with one clear message and leaves no output behind)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ambisam.data.datalist import load_datalist
from ambisam.data.ids import case_id
from ambisam.errors import InputError, find_input_error

__all__ = ["inference_items", "check_inputs"]


def inference_items(
    datalist: str | os.PathLike | None = None,
    split: str = "test",
    image: str | os.PathLike | None = None,
    box: str | os.PathLike | Sequence[int] | None = None,
    label: str | os.PathLike | Sequence[str] | None = None,
) -> list[dict]:
    """The cases to run: one image given directly, or a datalist split.

    Args:
        datalist: a datalist JSON (used when ``image`` is not given).
        split: the datalist's list to run.
        image: one volume or 2D image (anything MONAI's ``LoadImage`` reads).
        box: with ``image``: a box JSON file ``{"box": [i_min, j_min, k_min, i_max, j_max, k_max]}`` or that list.
        label: with ``image``: rater mask file(s) to derive box prompts from (and to score against).

    Returns:
        Items ``{"image", "id"[, "box"][, "label"]}``.

    Raises:
        InputError: a missing image, box or label file, or neither ``image`` nor ``datalist``.
    """
    if image is None:
        if datalist is None:
            raise InputError(None, "give an image (--image PATH) or a datalist (--datalist PATH)")
        return load_datalist(datalist, split)
    image = Path(image)
    if not image.is_file():
        raise InputError(image, "image file not found")
    item: dict = {"image": str(image), "id": case_id(image)}
    if box is not None:
        if isinstance(box, (str, os.PathLike)) and not Path(box).is_file():
            raise InputError(box, "box file not found")
        item["box"] = str(box) if isinstance(box, (str, os.PathLike)) else list(box)
    if label is not None:
        labels = [label] if isinstance(label, (str, os.PathLike)) else list(label)
        for path in labels:
            if not Path(path).is_file():
                raise InputError(path, "label file not found")
        item["label"] = [str(p) for p in labels]
    return [item]


def check_inputs(items: Sequence[dict], transform: Callable) -> Sequence[dict]:
    """Run ``transform`` (loading and validation) over every item before any output is written.

    MONAI wraps a transform's exception in ``RuntimeError("applying transform ...")``; the user's problem is
    the :class:`~ambisam.errors.InputError` inside, which is raised on its own.

    Args:
        items: the cases.
        transform: the loading/validation part of the pre-processing.

    Returns:
        ``items``, unchanged.

    Raises:
        InputError: the first bad case, naming its file and the problem (a file no reader can load is reported
            against the case's image, with the reader's own message, which names the file).
    """
    for item in items:
        try:
            transform(dict(item))
        except Exception as e:  # noqa: BLE001 - every failure here is a problem with this item's files
            found = find_input_error(e)
            if found is not None:
                raise InputError(found.path, found.problem) from None
            root = e
            while root.__cause__ is not None:
                root = root.__cause__
            raise InputError(item.get("image"), f"cannot be loaded ({type(root).__name__}: {root})") from None
    return items
