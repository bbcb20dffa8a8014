"""Dice / HD95 per region equal MONAI's metrics on known masks; empty masks follow the stated rules."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from scipy import ndimage

from mambascope.data.brats import labels_to_regions
from mambascope.eval.segmentation import case_metrics, region_scores, summarize, volume_diagonal_mm
from mambascope.sample_data import sample_path


@pytest.fixture(scope="module")
def real_regions() -> np.ndarray:
    """TC/WT/ET of the bundled label map, cropped around the tumour to keep HD95 fast."""
    labels = np.asanyarray(nib.load(str(sample_path("TCGA-FG-6692/seg_fusion_simple.nii.gz"))).dataobj)
    return labels_to_regions(labels[50:115, 45:125, 50:120], 4)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI warns about its own deprecated internals
def test_dice_and_hd95_equal_monai_on_real_masks(real_regions):
    pred = np.stack([ndimage.binary_erosion(real_regions[0], iterations=1),
                     np.roll(real_regions[1], 3, axis=0),
                     ndimage.binary_dilation(real_regions[2], iterations=2)])
    spacing = (1.0, 1.2, 2.0)
    dice, hd95 = region_scores(pred, real_regions, spacing)

    y_pred, y = torch.from_numpy(pred[None]).float(), torch.from_numpy(real_regions[None]).float()
    monai_dice = DiceMetric(include_background=True, reduction="none")(y_pred, y).numpy()
    monai_hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
        y_pred, y, spacing=list(spacing)).numpy()
    np.testing.assert_allclose(dice, monai_dice, rtol=1e-6)
    np.testing.assert_allclose(hd95, monai_hd, rtol=1e-6)
    # and the numbers are what the masks say: Dice by counting, a 3-voxel shift along x (1 mm) -> 3 mm
    inter = (pred[1] & real_regions[1]).sum()
    assert dice[0, 1] == pytest.approx(2 * inter / (pred[1].sum() + real_regions[1].sum()))
    assert hd95[0, 1] == pytest.approx(3.0, abs=0.01)
    assert 0.0 < dice[0, 0] < 1.0 and hd95[0, 0] > 0


def test_empty_masks_follow_brats_rules():
    empty = np.zeros((3, 10, 12, 14), dtype=bool)
    cube = empty.copy()
    cube[:, 2:5, 3:7, 4:9] = True
    spacing = (1.0, 1.0, 2.0)
    diagonal = math.sqrt(10**2 + 12**2 + 28**2)
    assert volume_diagonal_mm((10, 12, 14), spacing) == pytest.approx(diagonal)
    dice, hd95 = region_scores(empty, empty, spacing)  # both empty: perfect
    np.testing.assert_array_equal(dice, 1.0)
    np.testing.assert_array_equal(hd95, 0.0)
    for pred, target in ((cube, empty), (empty, cube)):  # one empty: worst score, finite
        dice, hd95 = region_scores(pred, target, spacing)
        np.testing.assert_array_equal(dice, 0.0)
        np.testing.assert_allclose(hd95, diagonal)
    mixed = cube.copy()
    mixed[2] = False  # ET absent in the prediction only
    row = case_metrics(mixed, cube, spacing)
    assert (row["dice_TC"], row["dice_ET"], row["hd95_TC"]) == (1.0, 0.0, 0.0)
    assert row["hd95_ET"] == pytest.approx(diagonal)
    assert row["dice_mean"] == pytest.approx(2 / 3)
    summary = summarize([row, case_metrics(cube, cube, spacing)])
    assert summary["n_cases"] == 2 and summary["dice_ET"] == pytest.approx(0.5)
