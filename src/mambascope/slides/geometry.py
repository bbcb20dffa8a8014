"""Patch geometry in physical units: from `--magnification` or `--mpp` to level-0 patch size and grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mambascope.errors import ConfigError, SlideReadError
from mambascope.slides.reader import Slide

#: objective power of a scan at 1 µm/px, by the usual convention (0.25 µm/px ≈ 40×, 0.5 µm/px ≈ 20×)
MICRONS_AT_1X = 10.0
_SNAP_TOLERANCE = 0.02  # 0.499 vs 0.5 µm/px is the same resolution; read 1:1 rather than resample 0.2%


@dataclass(frozen=True)
class PatchGeometry:
    """Where patches come from: sizes at the target resolution and at level 0, grid step, read level."""

    patch_size: int
    patch_size_level0: int
    step_level0: int
    overlap: int
    patch_level: int
    level0_mpp: float
    level0_magnification: float
    target_mpp: float
    target_magnification: float


def _snap(scale: float) -> float:
    nearest = round(scale)
    return float(nearest) if nearest >= 1 and abs(scale - nearest) <= _SNAP_TOLERANCE * scale else scale


def patch_geometry(slide: Slide, patch_size: int, *, magnification: float | None = None, mpp: float | None = None,
                   overlap: int = 0, allow_upsample: bool = False) -> PatchGeometry:
    """Resolve the target resolution against this slide's own mpp and objective power.

    A magnification converts with the slide's objective power (or, without one, the 10 µm/px-at-1×
    convention applied to its mpp), so "20×" on a 40× scan reads at twice its pixel size.
    """
    if (magnification is None) == (mpp is None):
        raise ConfigError("give exactly one of magnification or mpp", hint="e.g. --magnification 20 or --mpp 0.5")
    if patch_size < 1:
        raise ConfigError(f"patch size must be positive, got {patch_size}")
    if not 0 <= overlap < patch_size:
        raise ConfigError(f"overlap must be in 0..{patch_size - 1} pixels, got {overlap}",
                          hint="overlap is in pixels at the target resolution")
    if slide.mpp is None:
        raise SlideReadError("slide has no mpp (microns per pixel) in its metadata", path=slide.path,
                             hint="add an `mpp` column with the level-0 µm/px for this slide to the slide CSV")
    level0_mpp = slide.mpp
    level0_magnification = slide.magnification or MICRONS_AT_1X / level0_mpp
    if mpp is not None:
        scale = mpp / level0_mpp
    else:
        if magnification is None or magnification <= 0:
            raise ConfigError(f"magnification must be positive, got {magnification}")
        scale = level0_magnification / magnification
    scale = _snap(scale)
    if scale < 1 and not allow_upsample:
        raise SlideReadError(
            f"requested resolution ({level0_mpp * scale:.3g} µm/px, {level0_magnification / scale:.3g}×) is finer "
            f"than the scan ({level0_mpp:.3g} µm/px, {level0_magnification:.3g}×)", path=slide.path,
            hint="ask for a magnification at or below the scan's, or pass --allow-upsample")
    return PatchGeometry(
        patch_size=patch_size,
        patch_size_level0=max(1, round(patch_size * scale)),
        step_level0=max(1, round((patch_size - overlap) * scale)),
        overlap=overlap,
        patch_level=slide.best_level_for_downsample(scale),
        level0_mpp=level0_mpp,
        level0_magnification=level0_magnification,
        target_mpp=level0_mpp * scale,
        target_magnification=level0_magnification / scale,
    )


def grid_coords(dimensions: tuple[int, int], geometry: PatchGeometry) -> np.ndarray:
    """Level-0 top-left corners of every patch that lies wholly inside the slide, row by row."""
    width, height = dimensions
    xs = np.arange(0, width - geometry.patch_size_level0 + 1, geometry.step_level0, dtype=np.int64)
    ys = np.arange(0, height - geometry.patch_size_level0 + 1, geometry.step_level0, dtype=np.int64)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([grid_x.ravel(), grid_y.ravel()], axis=1)
