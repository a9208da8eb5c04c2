"""Figures written as PNG (matplotlib, Agg backend): the per-case overview of image, raters, samples, mean and
uncertainty that the demo, the bundles and the benchmark share."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ambisam.io import atomic_path

__all__ = ["overview_png", "lesion_slice"]


def lesion_slice(raters: np.ndarray) -> int:
    """Index of the slice (last axis) where the raters' union is largest.

    Args:
        raters: ``(K, H, W, D)``.
    """
    return int(np.asarray(raters).any(0).sum(axis=(0, 1)).argmax())


def overview_png(path: str | os.PathLike, rows: Sequence[dict], max_samples: int = 8, title: str | None = None) -> Path:
    """One row per case: image, each rater, up to ``max_samples`` samples, the mean and the uncertainty.

    Args:
        path: the PNG to write.
        rows: dicts with ``image (H, W)``, ``raters (K, H, W)``, ``samples (N, H, W)``, ``mean (H, W)``,
            ``uncertainty (H, W)`` and a ``label`` string.
        max_samples: samples shown per row.
        title: the figure's title.

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(len(r["raters"]) for r in rows)
    n = min(max_samples, max(len(r["samples"]) for r in rows))
    cols = 1 + k + n + 2
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.7 * len(rows) + 0.4), squeeze=False)
    for r, row in enumerate(rows):
        panels = [("image", row["image"], "gray", None)]
        panels += [(f"rater {i + 1}", m, "gray", (0, 1)) for i, m in enumerate(row["raters"])]
        panels += [(f"sample {i + 1}", s, "gray", (0, 1)) for i, s in enumerate(row["samples"][:n])]
        panels += [("mean", row["mean"], "viridis", (0, 1)), ("uncertainty", row["uncertainty"], "magma", (0, 1))]
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(panels):
                name, img, cmap, lim = panels[c]
                ax.imshow(np.asarray(img), cmap=cmap, vmin=None if lim is None else lim[0], vmax=None if lim is None else lim[1])
                ax.set_title(name if r == 0 else "", fontsize=7)
        axes[r][0].text(-0.08, 0.5, row.get("label", ""), transform=axes[r][0].transAxes, rotation=90,
                        va="center", ha="right", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)
