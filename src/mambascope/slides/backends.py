"""Pixel sources behind :class:`mambascope.slides.reader.Slide`: OpenSlide, tiffslide and plain images.

Each backend answers the same four questions (level sizes, level downsamples, metadata properties and
an in-bounds RGB read at one level) so that the `Slide` above them handles bounds, padding, resizing
and resolution in one place.
"""

from __future__ import annotations

import contextlib
import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

#: suffixes of files only the plain-image backend can read
PLAIN_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
#: suffixes tifffile reads (plain, OME and pyramidal TIFF)
TIFF_SUFFIXES = frozenset({".tif", ".tiff", ".btf", ".tf8"})
TIFF_MAGIC = frozenset({b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"})

_UM_PER_UNIT = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Silence a library's warnings while it probes a file: a failure is reported as one SlideReadError."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


class Backend(Protocol):
    """What a slide library must provide; reads are already clipped to the level's bounds."""

    name: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: Mapping[str, str]

    def read(self, location_level0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray: ...

    def close(self) -> None: ...


def to_rgb_uint8(pixels: np.ndarray) -> np.ndarray:
    """Gray, RGBA (composited on white) or 16-bit pixels as (h, w, 3) uint8 RGB."""
    array = np.asarray(pixels)
    if array.dtype == np.uint16:
        array = (array.astype(np.uint32) // 257).astype(np.uint8)
    elif array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        raise ValueError(f"pixel type {array.dtype} is not an 8- or 16-bit brightfield image")
    if array.ndim == 2:
        array = array[..., None]
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        alpha = array[..., 3:4]
        if alpha.min() == 255:
            import cv2

            return cv2.cvtColor(array, cv2.COLOR_RGBA2RGB)  # one SIMD pass, faster than a strided copy
        weight = alpha.astype(np.uint16)
        blended = (array[..., :3].astype(np.uint16) * weight + 255 * (255 - weight) + 127) // 255
        return blended.astype(np.uint8)
    if channels == 3:
        return np.ascontiguousarray(array)
    raise ValueError(f"{channels} channels; only gray, RGB and RGBA brightfield images are supported")


class OpenSlideLikeBackend:
    """OpenSlide or tiffslide (same API); `opener` is `openslide.OpenSlide` or `tiffslide.TiffSlide`."""

    def __init__(self, path: Path, opener: Any, name: str):
        self.name = name
        with quiet_logger("tifffile"):  # tiffslide reads through tifffile
            self._handle = opener(str(path))
        self.level_dimensions = tuple((int(w), int(h)) for w, h in self._handle.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._handle.level_downsamples)
        self.properties = {str(k): str(v) for k, v in self._handle.properties.items() if v is not None}

    def read(self, location_level0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        region = self._handle.read_region(location_level0, level, size)
        return to_rgb_uint8(np.asarray(region))

    def close(self) -> None:
        self._handle.close()


@dataclass
class ImageBackend:
    """A whole image held in memory: PNG/JPEG (OpenCV) or TIFF/OME-TIFF (tifffile), all its levels."""

    path: Path
    name: str = "image"
    levels: list[np.ndarray] = field(default_factory=list)
    properties: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        with open(self.path, "rb") as handle:
            is_tiff = handle.read(4) in TIFF_MAGIC
        if is_tiff:
            self._load_tiff()
        else:
            self._load_plain()
        if not self.levels:
            raise ValueError("no image data")

    def _load_plain(self) -> None:
        import cv2

        pixels = cv2.imread(str(self.path), cv2.IMREAD_UNCHANGED)
        if pixels is None:
            raise ValueError("OpenCV cannot decode the image")
        if pixels.ndim == 3 and pixels.shape[2] == 3:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
        elif pixels.ndim == 3 and pixels.shape[2] == 4:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA)
        self.levels = [to_rgb_uint8(pixels)]

    def _load_tiff(self) -> None:
        import tifffile

        with quiet_logger("tifffile"), tifffile.TiffFile(self.path) as tif:
            series = tif.series[0]
            self.levels = [to_rgb_uint8(_channels_last(level.asarray(), level.axes)) for level in series.levels]
            self.properties.update(_tiff_resolution_properties(tif.pages[0]))
            if tif.is_ome and tif.ome_metadata:
                self.properties.update(ome_properties(tif.ome_metadata))

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(a.shape[1]), int(a.shape[0])) for a in self.levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        width0, height0 = self.level_dimensions[0]
        return tuple((width0 / w + height0 / h) / 2 for w, h in self.level_dimensions)

    def read(self, location_level0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        downsample = self.level_downsamples[level]
        x, y = (round(c / downsample) for c in location_level0)
        return self.levels[level][y:y + size[1], x:x + size[0]].copy()  # never hand out a view of the image

    def close(self) -> None:
        self.levels = []


def _channels_last(array: np.ndarray, axes: str) -> np.ndarray:
    """Drop singleton T/Z/C axes and put samples last, so the result is (Y, X) or (Y, X, S)."""
    axes = axes.upper()
    for axis in "TZQ":
        while axis in axes and array.shape[axes.index(axis)] == 1:
            array = np.take(array, 0, axis=axes.index(axis))
            axes = axes.replace(axis, "", 1)
    if "C" in axes and "S" not in axes:
        array = np.moveaxis(array, axes.index("C"), -1)
        axes = axes.replace("C", "") + "S"
    if axes not in {"YX", "YXS"}:
        raise ValueError(f"image axes {axes} with shape {array.shape} are not a 2D RGB/gray image")
    return array


def _tiff_resolution_properties(page: Any) -> dict[str, str]:
    """TIFF resolution tags in OpenSlide's property names (`tiff.XResolution`, `tiff.ResolutionUnit`)."""
    tags = page.tags
    props: dict[str, str] = {}
    for key in ("XResolution", "YResolution"):
        tag = tags.get(key)
        if tag is not None:
            numerator, denominator = tag.value
            if denominator:
                props[f"tiff.{key}"] = str(numerator / denominator)
    unit = tags.get("ResolutionUnit")
    if unit is not None:
        props["tiff.ResolutionUnit"] = {1: "none", 2: "inch", 3: "centimeter"}.get(int(unit.value), "none")
    return props


def ome_properties(ome_xml: str) -> dict[str, str]:
    """Physical pixel size (as `ome.mpp-x`/`ome.mpp-y` in µm) and objective magnification from OME-XML."""
    root = ET.fromstring(ome_xml)
    props: dict[str, str] = {}
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None)
    if pixels is not None:
        for axis in ("X", "Y"):
            value = pixels.get(f"PhysicalSize{axis}")
            if value is not None:
                unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
                props[f"ome.mpp-{axis.lower()}"] = str(float(value) * _UM_PER_UNIT.get(unit, 1.0))
    objective = next((el for el in root.iter() if el.tag.endswith("}Objective")), None)
    if objective is not None and objective.get("NominalMagnification"):
        props["ome.objective-power"] = objective.get("NominalMagnification", "")
    return props
