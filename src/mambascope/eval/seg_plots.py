"""Pictures of a segmentation run: training curves, and slices with ground truth and prediction overlaid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mambascope.atomic import atomic_path
from mambascope.data.brats import REGIONS

#: overlay colours (RGBA) for TC, WT, ET; WT drawn first so the nested regions stay visible
REGION_COLOURS = {"WT": (0.1, 0.8, 0.2, 0.45), "TC": (0.95, 0.85, 0.1, 0.55), "ET": (0.9, 0.1, 0.1, 0.65)}


def _save(fig, path: Path) -> Path:  # fig: matplotlib Figure
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_training_curves(history: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """Loss (train and val) and validation Dice / HD95 per epoch; series may be shorter than `epoch`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dice, ax_hd) = plt.subplots(1, 3, figsize=(14, 4))
    for key, ax in (("train_loss", ax_loss), ("val_loss", ax_loss)):
        values = history.get(key, [])
        ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=key.replace("_", " "))
    for region in (*REGIONS, "mean"):
        dice = history.get(f"val_dice_{region}", [])
        hd95 = history.get(f"val_hd95_{region}", [])
        style = {"lw": 2.5, "color": "black"} if region == "mean" else {"lw": 1.2}
        ax_dice.plot(range(1, len(dice) + 1), dice, label=region, **style)
        ax_hd.plot(range(1, len(hd95) + 1), hd95, label=region, **style)
    ax_loss.set(title="Dice + BCE loss", xlabel="epoch")
    ax_dice.set(title="validation Dice", xlabel="validation", ylim=(0, 1))
    ax_hd.set(title="validation HD95 (mm)", xlabel="validation")
    for ax in (ax_loss, ax_dice, ax_hd):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def tumour_slice(target: np.ndarray) -> int:
    """Axial slice (last axis) of (3, D, H, W) TC/WT/ET masks with the most whole-tumour voxels (else middle)."""
    per_slice = target[REGIONS.index("WT")].sum((0, 1))
    return int(per_slice.argmax()) if per_slice.any() else target.shape[-1] // 2


def _overlay(ax, background: np.ndarray, regions: np.ndarray, title: str) -> None:
    ax.imshow(background.T, cmap="gray", origin="lower")
    for name in ("WT", "TC", "ET"):
        mask = regions[REGIONS.index(name)].T
        rgba = np.zeros((*mask.shape, 4))
        rgba[mask] = REGION_COLOURS[name]
        ax.imshow(rgba, origin="lower")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def plot_val_predictions(image: np.ndarray, target: np.ndarray, pred: np.ndarray, path: str | Path,
                         title: str = "") -> Path:
    """One axial slice through the largest tumour area: image, ground truth overlay, prediction overlay.

    `image` (D, H, W) one modality; `target`, `pred` (3, D, H, W) boolean TC/WT/ET.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    z = tumour_slice(target)
    background = image[..., z]
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    axes[0].imshow(background.T, cmap="gray", origin="lower")
    axes[0].set_title(f"image, slice {z}", fontsize=9)
    axes[0].axis("off")
    _overlay(axes[1], background, target[..., z].astype(bool), "ground truth")
    _overlay(axes[2], background, pred[..., z].astype(bool), "prediction")
    fig.legend(handles=[Patch(color=REGION_COLOURS[n], label=n) for n in ("WT", "TC", "ET")], loc="lower center",
               ncol=3, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
