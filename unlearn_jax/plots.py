"""PNG plots of a run: loss curves and localization masks (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from unlearn_jax.atomic import atomic_file


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(history: list[dict], path: str | Path):
    plt = _figure()
    keys = [k for k in ("loss", "loss_unlearn", "loss_loc", "loss_pre") if any(k in r for r in history)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    steps = [r["step"] for r in history]
    for ax, k in zip(axes[0], keys):
        ax.plot(steps, [r.get(k, np.nan) for r in history])
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.set_yscale("symlog", linthresh=1e-6)
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)


def plot_masks(masks: np.ndarray, path: str | Path, title: str = ""):
    """masks (L, F, H, W) in {0, 1}: one row per layer, one column per token frame."""
    plt = _figure()
    L, F = masks.shape[:2]
    fig, axes = plt.subplots(L, F, figsize=(1.2 * F + 1, 1.0 * L + 1), squeeze=False)
    for l in range(L):
        for f in range(F):
            ax = axes[l][f]
            ax.imshow(masks[l, f], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if f == 0:
                ax.set_ylabel(f"L{l}", fontsize=7)
    fig.suptitle(f"localization masks: {title}", fontsize=9)
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=80)
    plt.close(fig)
