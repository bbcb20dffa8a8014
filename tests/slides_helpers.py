"""Shared helpers for slide tests: real sample slides, a pyramidal TIFF written from real pixels, broken copies."""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np

from mambascope.sample_data import sample_path
from mambascope.slides.pyramid_tiff import write_pyramidal_tiff
from mambascope.slides.reader import open_slide

SVS = "CMU-1-Small-Region.svs"
OME_HE = "OS-1-detail.ome.tif"
OME_IHC_NDPI = "OS-2-ndpi.ome.tif"
OME_IHC_VSI = "OS-2-vsi.ome.tif"
REAL_SLIDES = (SVS, OME_HE, OME_IHC_NDPI, OME_IHC_VSI)


@functools.lru_cache(maxsize=1)
def svs_pixels() -> np.ndarray:
    """All level-0 pixels of the real Aperio SVS (2967 x 2220 RGB)."""
    with open_slide(sample_path(SVS)) as slide:
        return slide.read_region((0, 0), 0, slide.dimensions)


def write_pyramid_tiff(path: Path, level0: np.ndarray, mpp: float, levels: int = 3, factor: int = 4,
                       tile: int = 256, compression: str = "jpeg") -> Path:
    """A tiled multi-resolution TIFF (reduced-resolution pages) with centimetre resolution tags for `mpp`."""
    return write_pyramidal_tiff(path, level0, mpp, tile=tile, factor=factor, min_size=1, max_levels=levels,
                                compression=compression)


def pyramid_from_svs(path: Path, mpp: float = 0.25) -> Path:
    """A 3-level pyramid (downsamples 1, 4, 16) of the real SVS pixels, twice as wide, labelled `mpp`."""
    return write_pyramid_tiff(path, np.ascontiguousarray(np.tile(svs_pixels(), (1, 2, 1))), mpp)


def truncated_copy(name: str, path: Path, fraction: float) -> Path:
    """The first `fraction` of a bundled file's bytes."""
    data = sample_path(name).read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def corrupted_copy(name: str, path: Path, start: int, stop: int, seed: int = 0) -> Path:
    """A bundled file with bytes [start, stop) replaced by random bytes (header intact, tile data broken)."""
    data = bytearray(sample_path(name).read_bytes())
    data[start:stop] = np.random.default_rng(seed).integers(0, 256, stop - start, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def background_fraction(rgb: np.ndarray) -> float:
    """Share of nearly white, unsaturated pixels (glass)."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    return float(((hsv[..., 1] < 20) & (hsv[..., 2] > 200)).mean())
