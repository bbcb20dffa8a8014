"""Tissue masks at low resolution: automatic (saturation + Otsu) or a user's mask image, and per-patch
tissue fractions measured by area.

Automatic detection works on saturation blurred over a few microns, so that cell texture does not
matter at any scan resolution. Otsu alone splits a field that is all tissue (or all glass) in two and drops the
faint counterstain of IHC, so when the slide shows glass (its brightest pixels) tissue is whatever is a
margin more saturated than the glass, and Otsu is used, capped, only for fields with no glass; morphology, hole filling and a minimum area, all in
physical units, then clean the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mambascope.errors import DataError

# Background = the brightest 1% of pixels, when those are bright and unsaturated (i.e. glass).
_BACKGROUND_PERCENTILE = 99.0
_GLASS_MIN_VALUE = 200.0
_GLASS_MAX_SATURATION = 40.0
_NO_GLASS_THRESHOLD = 20.0  # saturation cap when the field shows no glass at all
_DARK_VALUE = 20.0  # nearly black pixels (scanner padding) are never tissue


@dataclass(frozen=True)
class TissueParams:
    """Automatic tissue detection settings, in physical units so they mean the same at any resolution."""

    blur_um: float = 8.0  # Gaussian sigma applied to saturation and brightness
    saturation_margin: float = 6.0  # tissue is this much more saturated than the background (0-255 scale)
    close_um: float = 16.0  # closing diameter: joins nuclei and cytoplasm into tissue
    min_area_um2: float = 20_000.0  # smaller tissue pieces are dropped
    max_hole_area_um2: float = 20_000.0  # smaller holes are filled; larger (fat, lumen) stay holes


def _odd_kernel(diameter_px: float) -> np.ndarray:
    import cv2

    size = max(3, round(diameter_px) | 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def saturation_threshold(saturation: np.ndarray, value: np.ndarray, margin: float) -> float:
    """The saturation above which a pixel is tissue.

    When the field shows glass, tissue is anything `margin` more saturated than the glass: Otsu would
    split an all-glass field's noise in two, or drop faint counterstain. With no glass in view, Otsu's
    threshold, capped so an all-tissue field is not split in half.
    """
    import cv2

    otsu, _ = cv2.threshold(np.clip(saturation, 0, 255).astype(np.uint8), 0, 255,
                            cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    bright = value >= np.percentile(value, _BACKGROUND_PERCENTILE)
    glass_value, glass_saturation = float(np.median(value[bright])), float(np.median(saturation[bright]))
    if glass_value >= _GLASS_MIN_VALUE and glass_saturation <= _GLASS_MAX_SATURATION:
        return glass_saturation + margin
    return min(float(otsu), _NO_GLASS_THRESHOLD)


def remove_small_regions(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """`mask` without 8-connected components smaller than `min_area_px` pixels."""
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False
    return keep[labels] if count > 1 else np.zeros_like(mask, dtype=bool)


def fill_small_holes(mask: np.ndarray, max_hole_px: float) -> np.ndarray:
    """`mask` with background regions that do not touch the border and are smaller than `max_hole_px` filled."""
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=4)
    left, top = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    right, bottom = left + stats[:, cv2.CC_STAT_WIDTH], top + stats[:, cv2.CC_STAT_HEIGHT]
    inner = (left > 0) & (top > 0) & (right < mask.shape[1]) & (bottom < mask.shape[0])
    fill = inner & (stats[:, cv2.CC_STAT_AREA] < max_hole_px)
    fill[0] = False  # label 0 is the tissue itself
    return mask | fill[labels] if count > 1 else mask.copy()


def detect_tissue(rgb: np.ndarray, um_per_px: float, params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean tissue mask of an RGB image whose pixels are `um_per_px` microns wide."""
    import cv2

    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    saturation, value = hsv[..., 1].astype(np.float32), hsv[..., 2].astype(np.float32)
    sigma = params.blur_um / um_per_px
    if sigma >= 0.5:
        saturation = cv2.GaussianBlur(saturation, (0, 0), sigma)
        value = cv2.GaussianBlur(value, (0, 0), sigma)
    threshold = saturation_threshold(saturation, value, params.saturation_margin)
    mask = ((saturation > threshold) & (value > _DARK_VALUE)).astype(np.uint8)
    kernel = _odd_kernel(params.close_um / um_per_px)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel).astype(bool)
    px_area = um_per_px**2
    mask = fill_small_holes(mask, params.max_hole_area_um2 / px_area)
    return remove_small_regions(mask, params.min_area_um2 / px_area)


def load_user_mask(path: Path, shape: tuple[int, int], slide_size: tuple[int, int]) -> np.ndarray:
    """A user's mask image (non-zero = tissue, any size) resized to `shape` (h, w) of the tissue grid.

    Its aspect ratio must match the slide's, or it was drawn for another image.
    """
    import cv2

    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise DataError("cannot read tissue mask image", path=path, hint="save the mask as an 8-bit PNG")
    if pixels.ndim == 3:
        pixels = pixels.max(axis=2)
    mask_h, mask_w = pixels.shape
    slide_w, slide_h = slide_size
    mismatch = abs(mask_w * slide_h - mask_h * slide_w) / (slide_w * mask_h)
    if mismatch > 0.02 + 1.0 / min(mask_w, mask_h):
        raise DataError(f"mask aspect ratio {mask_w}x{mask_h} does not match the slide's {slide_w}x{slide_h}",
                        path=path, hint="draw the mask over the whole slide (any scale, same aspect ratio)")
    resized = cv2.resize((pixels > 0).astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return resized.astype(bool)


def _bilinear(table: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """`table` sampled at fractional (x, y), clipped to its extent."""
    x = np.clip(x, 0, table.shape[1] - 1)
    y = np.clip(y, 0, table.shape[0] - 1)
    x0, y0 = np.minimum(x.astype(np.int64), table.shape[1] - 2), np.minimum(y.astype(np.int64), table.shape[0] - 2)
    fx, fy = x - x0, y - y0
    top = table[y0, x0] * (1 - fx) + table[y0, x0 + 1] * fx
    bottom = table[y0 + 1, x0] * (1 - fx) + table[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def tissue_fractions(mask: np.ndarray, coords_level0: np.ndarray, size_level0: int,
                     slide_size: tuple[int, int]) -> np.ndarray:
    """Fraction (0-1) of each square patch's area covered by tissue in `mask`, exactly by area.

    The summed-area table of a pixel mask is bilinear inside every pixel, so interpolating it at the
    patch corners integrates the mask over fractional pixels without resampling it.
    """
    if len(coords_level0) == 0:
        return np.zeros(0)
    height, width = mask.shape
    scale_x, scale_y = width / slide_size[0], height / slide_size[1]
    table = np.zeros((height + 1, width + 1))
    table[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    x0, y0 = coords_level0[:, 0] * scale_x, coords_level0[:, 1] * scale_y
    x1, y1 = (coords_level0[:, 0] + size_level0) * scale_x, (coords_level0[:, 1] + size_level0) * scale_y
    area = (_bilinear(table, x1, y1) - _bilinear(table, x0, y1) - _bilinear(table, x1, y0)
            + _bilinear(table, x0, y0))
    return np.clip(area / ((x1 - x0) * (y1 - y0)), 0.0, 1.0)
