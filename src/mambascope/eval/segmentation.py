"""Dice and HD95 per BraTS region, computed by MONAI's metrics, with empty masks handled explicitly.

Empty masks (a region absent from the ground truth, the prediction, or both) follow the BraTS challenge:

* Dice: both empty -> 1.0; exactly one empty -> 0.0 (MONAI `DiceMetric(ignore_empty=False)`).
* HD95: both empty -> 0.0; exactly one empty -> the diagonal of the volume in mm (the largest distance
  possible in that grid, 373.13 mm for BraTS's 240x240x155 at 1 mm), where MONAI would give inf or NaN.

So every case has a finite score per region and means over cases are defined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from mambascope.data.brats import REGIONS


def _as_batch(masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(R, D, H, W) or (B, R, D, H, W) boolean-like -> (B, R, D, H, W) float tensor."""
    tensor = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks)
    if tensor.ndim == 4:
        tensor = tensor[None]
    if tensor.ndim != 5:
        raise ValueError(f"expected (regions, D, H, W) or (batch, regions, D, H, W) masks, got {tuple(tensor.shape)}")
    return (tensor > 0.5 if tensor.is_floating_point() else tensor.bool()).float()


def volume_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the diagonal of a voxel grid, in mm: the HD95 given when exactly one mask is empty."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def region_scores(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
                  spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Per-case, per-region Dice and HD95 (mm): two (batch, regions) arrays, finite everywhere."""
    from monai.metrics import compute_dice, compute_hausdorff_distance

    y_pred, y = _as_batch(pred), _as_batch(target)
    if y_pred.shape != y.shape:
        raise ValueError(f"prediction {tuple(y_pred.shape)} and target {tuple(y.shape)} differ in shape")
    dice = compute_dice(y_pred, y, include_background=True, ignore_empty=False).cpu().numpy()
    pred_any = y_pred.flatten(2).any(-1).cpu().numpy()
    target_any = y.flatten(2).any(-1).cpu().numpy()
    hd95 = np.zeros(dice.shape, dtype=np.float64)
    both = pred_any & target_any
    if both.any():
        import warnings

        with warnings.catch_warnings():  # empty pairs are replaced below; MONAI's own warnings are noise
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            full = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                                              spacing=list(spacing)).cpu().numpy()
        hd95[both] = full[both]
    hd95[pred_any ^ target_any] = volume_diagonal_mm(y.shape[2:], spacing)
    return dice.astype(np.float64), hd95


def case_metrics(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0), regions: Sequence[str] = REGIONS) -> dict[str, float]:
    """Dice and HD95 of one case as a flat dict: `dice_TC`, ..., `hd95_ET`, `dice_mean`, `hd95_mean`."""
    dice, hd95 = region_scores(pred, target, spacing)
    row = {f"dice_{r}": float(dice[0, i]) for i, r in enumerate(regions)}
    row.update({f"hd95_{r}": float(hd95[0, i]) for i, r in enumerate(regions)})
    row["dice_mean"] = float(dice[0].mean())
    row["hd95_mean"] = float(hd95[0].mean())
    return row


def summarize(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of every numeric metric over cases (plus `n_cases`)."""
    keys = [k for k in (rows[0] if rows else {}) if isinstance(rows[0][k], (int, float))]
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    summary["n_cases"] = len(rows)
    return summary
