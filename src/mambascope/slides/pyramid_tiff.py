"""Write an RGB image as a tiled, pyramidal TIFF that OpenSlide and tiffslide open as a slide.

Used to make slides from real pixels (the demo cohort, test fixtures, benchmarks). Levels are
successive TIFF directories, each `factor` times smaller than the one before, with resolution tags
giving the microns per pixel: the layout OpenSlide's generic-TIFF reader and tiffslide understand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mambascope.atomic import atomic_path


def write_pyramidal_tiff(
    path: str | Path,
    rgb: np.ndarray,
    mpp: float,
    *,
    tile: int = 256,
    factor: int = 2,
    min_size: int = 512,
    max_levels: int = 8,
    compression: str = "jpeg",
) -> Path:
    """Write `rgb` (H, W, 3) uint8 as a tiled pyramid with `mpp` microns per level-0 pixel.

    Each level is `factor` times smaller (area-averaged); levels stop before the smaller side drops
    under `min_size` or at `max_levels`. Returns the path written (atomically).
    """
    import cv2
    import tifffile

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    levels = [rgb]
    while len(levels) < max_levels and min(levels[-1].shape[:2]) // factor >= min_size:
        height, width = levels[-1].shape[:2]
        levels.append(cv2.resize(levels[-1], (width // factor, height // factor), interpolation=cv2.INTER_AREA))
    path = Path(path)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=rgb.size > 2**31) as tif:
        for index, level in enumerate(levels):
            pixels_per_cm = 1e4 / (mpp * rgb.shape[1] / level.shape[1])
            tif.write(
                level,
                photometric="rgb",
                tile=(tile, tile),
                compression=compression,
                resolution=(pixels_per_cm, pixels_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if index == 0 else 1,
                metadata=None,
            )
    return path
