"""Shared fixtures: the real LiteMedSAM backbone is built once per test session (per worker, about 3 s).

The machine has 2 cores. Run in parallel (pyproject's ``-n 2``), each worker computes on one thread and so do
the processes it starts (``OMP_NUM_THREADS``), so the workers share the cores instead of fighting over them.
"""

from __future__ import annotations

import os

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
_THREADS = max(1, 2 // _WORKERS)
os.environ["OMP_NUM_THREADS"] = str(_THREADS)  # before torch loads, and for every subprocess

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(_THREADS)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Every test starts with the worker's thread count: a test that sets another (the bench commands' ``threads``)
    would otherwise change the numerics of the tests after it on that worker."""
    torch.set_num_threads(_THREADS)
    yield
    torch.set_num_threads(_THREADS)


@pytest.fixture(scope="session")
def litemedsam():
    from ambisam.sam import build_backbone

    return build_backbone("litemedsam")


def noisy_ellipse(h=160, w=200, center=(80, 110), radii=(30, 45), noise=0.08, seed=0):
    """A noisy bright ellipse on a darker background: image in [0, 1], its mask, and its tight box."""
    yy, xx = np.mgrid[:h, :w]
    mask = ((yy - center[0]) / radii[0]) ** 2 + ((xx - center[1]) / radii[1]) ** 2 < 1
    image = np.clip(0.2 + 0.5 * mask + np.random.default_rng(seed).normal(0, noise, (h, w)), 0, 1)
    ys, xs = np.nonzero(mask)
    return image.astype(np.float32), mask, [xs.min(), ys.min(), xs.max(), ys.max()]


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="session")
def example(litemedsam):
    """One noisy ellipse: its embedding (computed once, no grad), box and mask in backbone input coordinates."""
    image, mask, box = noisy_ellipse()
    image = torch.from_numpy(image)[None, None]
    size = tuple(image.shape[-2:])
    litemedsam.eval()
    with torch.no_grad():
        embeddings = litemedsam.encode(image)
    s = litemedsam.image_size
    rater_mask = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(s, s), mode="nearest")
    return {
        "image": image,
        "pixel_box": torch.tensor([box], dtype=torch.float32),
        "embeddings": embeddings,  # (1, 256, 64, 64)
        "boxes": litemedsam.boxes_to_input(torch.tensor([box]), size),  # (1, 4)
        "rater_mask": rater_mask,  # (1, 1, 256, 256)
    }


class NotAWeight:
    """An object of a custom class: a checkpoint holding one needs pickle to load."""


def pickled_checkpoint(path, state=None):
    """Write ``{"model": state, "extra": NotAWeight()}`` with ``torch.save``: a checkpoint ``weights_only`` refuses.

    Returns:
        ``path``.
    """
    torch.save({"model": state if state is not None else {"w": torch.zeros(2)}, "extra": NotAWeight()}, path)
    return path
