"""Open any whole-slide image as one `Slide`: OpenSlide, tiffslide or a plain image behind one interface.

The `Slide` owns everything that does not depend on the library: level-0 coordinates, clipping and
white padding at the borders, reading at the best pyramid level for a requested resolution and resizing,
thumbnails, the physical resolution (mpp, objective) from standard or vendor metadata, and a cheap
content fingerprint that lets outputs be matched to the exact file they came from.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mambascope.errors import DataError, SlideReadError
from mambascope.slides.backends import (
    PLAIN_IMAGE_SUFFIXES,
    TIFF_SUFFIXES,
    Backend,
    ImageBackend,
    OpenSlideLikeBackend,
)
from mambascope.slides.tiff_tiles import TiffTileReader

#: file suffixes treated as slides when a directory is listed (DICOM series are folders)
SLIDE_SUFFIXES = frozenset({".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".qptiff",
                            *TIFF_SUFFIXES, *PLAIN_IMAGE_SUFFIXES})
DICOM_SUFFIX = ".dcm"
BACKENDS = ("auto", "openslide", "tiffslide", "image")
_STRIPPED_SUFFIXES = SLIDE_SUFFIXES | {".ome", DICOM_SUFFIX}
_FINGERPRINT_BYTES = 1 << 20
_LEVEL_TOLERANCE = 1.01  # a level 1% coarser than asked still counts as "at the resolution" (4.0003 vs 4)
_STRIP_PIXELS = 1 << 24  # pixels read per strip when downsampling a whole level

# Metadata keys, most standard first. Vendor keys are a fallback for files whose reader did not
# translate them into the standard `*.mpp-x` / `*.objective-power` names.
_MPP_KEYS = ("openslide.mpp-x", "tiffslide.mpp-x", "ome.mpp-x", "openslide.mpp-y", "tiffslide.mpp-y",
             "ome.mpp-y", "aperio.MPP")
_MAGNIFICATION_KEYS = ("openslide.objective-power", "tiffslide.objective-power", "ome.objective-power",
                       "aperio.AppMag", "hamamatsu.SourceLens", "leica.objective")
_UM_PER_RESOLUTION_UNIT = {"centimeter": 1e4, "inch": 25400.0}
_PLAUSIBLE_MPP = (0.02, 20.0)  # µm/px; rejects e.g. a default 72-dpi tag (352 µm/px)


def _fill_outside(canvas: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """White everywhere in `canvas` outside `box` = (x0, y0, x1, y1), the part inside the slide."""
    x0, y0, x1, y1 = box
    canvas[:y0] = 255
    canvas[y1:] = 255
    canvas[y0:y1, :x0] = 255
    canvas[y0:y1, x1:] = 255


def slide_id_from_path(path: str | Path) -> str:
    """The file name without its slide suffixes (`OS-1-detail.ome.tif` -> `OS-1-detail`).

    Only known slide suffixes are stripped, so dotted ids (TCGA barcodes with a UUID) survive. A DICOM
    series is named after its folder.
    """
    path = Path(path)
    if path.is_dir() or path.suffix.lower() == DICOM_SUFFIX:
        return (path if path.is_dir() else path.parent).name
    name = path.name
    while True:
        stem, dot, suffix = name.rpartition(".")
        if not dot or not stem or f".{suffix.lower()}" not in _STRIPPED_SUFFIXES:
            return name
        name = stem


def _positive_float(value: Any) -> float | None:
    """`value` as a finite positive float, or None (vendor fields hold text such as '0.4990' or '')."""
    try:
        number = float(str(value).split()[0].strip('"'))
    except (ValueError, IndexError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def mpp_from_properties(props: Mapping[str, str]) -> float | None:
    """Level-0 microns per pixel from standard keys, vendor keys, then TIFF resolution tags."""
    for key in _MPP_KEYS:
        value = _positive_float(props.get(key))
        if value is not None:
            return value
    spacing_mm = _positive_float(props.get("philips.DICOM_PIXEL_SPACING"))
    if spacing_mm is not None:
        return spacing_mm * 1e3
    resolution = _positive_float(props.get("tiff.XResolution"))
    unit = _UM_PER_RESOLUTION_UNIT.get(str(props.get("tiff.ResolutionUnit", "")).lower())
    if resolution is not None and unit is not None:
        mpp = unit / resolution
        if _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1]:
            return mpp
    return None


def magnification_from_properties(props: Mapping[str, str]) -> float | None:
    """Objective power of the scan from standard keys, then vendor keys."""
    for key in _MAGNIFICATION_KEYS:
        value = _positive_float(props.get(key))
        if value is not None:
            return value
    return None


def file_fingerprint(path: str | Path) -> str:
    """sha256 over sizes and the first and last MiB of each file (cheap on huge slides).

    A single file's name is left out, so a renamed or linked slide keeps its fingerprint; a folder
    (DICOM-WSI series) is fingerprinted over all its files, with their names.
    """
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name if path.is_dir() else ''}:{size};".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(_FINGERPRINT_BYTES))
            if size > _FINGERPRINT_BYTES:
                handle.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
                digest.update(handle.read())
    return digest.hexdigest()[:32]


class Slide:
    """One open whole-slide image; coordinates are level-0 pixels, pixels are (h, w, 3) uint8 RGB."""

    def __init__(self, path: Path, backend: Backend, slide_id: str, mpp_override: float | None = None):
        self.path = path
        self.slide_id = slide_id
        self._backend = backend
        self.reader: str = backend.name
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(backend.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(backend.level_downsamples)
        self.properties: dict[str, str] = dict(backend.properties)
        self.mpp: float | None = mpp_override if mpp_override is not None else mpp_from_properties(self.properties)
        self.magnification: float | None = magnification_from_properties(self.properties)
        self._tiles: TiffTileReader | None = None
        self._tile_checked: dict[int, bool] = {}

    def __repr__(self) -> str:
        return (f"Slide({self.slide_id!r}, reader={self.reader!r}, dimensions={self.dimensions}, "
                f"levels={self.level_count}, mpp={self.mpp}, magnification={self.magnification})")

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) at level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose resolution is at or above `downsample` (level 0 if none is)."""
        best = 0
        for level, level_downsample in enumerate(self.level_downsamples):
            if level_downsample <= downsample * _LEVEL_TOLERANCE and level_downsample >= self.level_downsamples[best]:
                best = level
        return best

    def read_region(self, location_level0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) RGB of `size` pixels at `level`, top-left at level-0 `location`; white outside the slide."""
        return self._region(location_level0, level, size, fast=False)

    def _region(self, location_level0: tuple[int, int], level: int, size: tuple[int, int], *, fast: bool,
                out: np.ndarray | None = None) -> np.ndarray:
        """`read_region`, from the verified tile reader when `fast` allows; filled into `out` when given."""
        if not 0 <= level < self.level_count:
            raise SlideReadError(f"level {level} does not exist (the slide has {self.level_count})",
                                 path=self.path, hint=f"use a level in 0..{self.level_count - 1}")
        width, height = (int(s) for s in size)
        if width <= 0 or height <= 0:
            raise SlideReadError(f"region size must be positive, got {size}", path=self.path)
        downsample = self.level_downsamples[level]
        level_width, level_height = self.level_dimensions[level]
        left, top = round(location_level0[0] / downsample), round(location_level0[1] / downsample)
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + width, level_width), min(top + height, level_height)
        canvas = np.empty((height, width, 3), dtype=np.uint8) if out is None else out
        if x1 <= x0 or y1 <= y0:
            canvas[:] = 255
            return canvas
        inside = (x0, y0, x1, y1) == (left, top, left + width, top + height)
        try:
            if fast and self._tile_level(level):
                target = canvas if inside else canvas[y0 - top:y1 - top, x0 - left:x1 - left]
                self._tiles.read(level, x0, y0, x1 - x0, y1 - y0, out=target)
                if not inside:
                    _fill_outside(canvas, (x0 - left, y0 - top, x1 - left, y1 - top))
                return canvas
            # ceil: every library divides the level-0 location by the downsample and floors or rounds
            origin = (math.ceil(x0 * downsample - 1e-6), math.ceil(y0 * downsample - 1e-6))
            pixels = self._backend.read(origin, level, (x1 - x0, y1 - y0))
        except Exception as exc:  # every library raises its own types; all mean "this file cannot be read"
            raise SlideReadError(f"cannot read pixels at {location_level0} level {level} ({exc})",
                                 path=self.path, hint="the file may be truncated or corrupt; copy it again") from exc
        if pixels.shape[:2] == (height, width):  # wholly inside the slide: nothing to pad
            if out is None:
                return pixels
            out[:] = pixels
            return out
        canvas[:] = 255
        rows, cols = min(pixels.shape[0], y1 - y0), min(pixels.shape[1], x1 - x0)
        canvas[y0 - top:y0 - top + rows, x0 - left:x0 - left + cols] = pixels[:rows, :cols]
        return canvas

    def read_patch(self, location_level0: tuple[int, int], size_level0: int, out_size: int) -> np.ndarray:
        """A square of `size_level0` level-0 pixels as (out_size, out_size, 3), read at the best level."""
        return self._patch(location_level0, size_level0, out_size, fast=False)

    def _patch(self, location_level0: tuple[int, int], size_level0: int, out_size: int, *, fast: bool,
               out: np.ndarray | None = None) -> np.ndarray:
        import cv2

        level = self.best_level_for_downsample(size_level0 / out_size)
        side = max(1, round(size_level0 / self.level_downsamples[level]))
        if side == out_size:
            return self._region(location_level0, level, (side, side), fast=fast, out=out)
        pixels = self._region(location_level0, level, (side, side), fast=fast)
        interpolation = cv2.INTER_AREA if side > out_size else cv2.INTER_LINEAR
        resized = cv2.resize(pixels, (out_size, out_size), interpolation=interpolation)
        if out is None:
            return resized
        out[:] = resized
        return out

    def read_patches(self, locations: np.ndarray, size_level0: int, out_size: int,
                     out: np.ndarray | None = None) -> np.ndarray:
        """`read_patch` for each level-0 (x, y) row of `locations`, as (n, out_size, out_size, 3).

        Pixels are the same as `read_patch`'s, but on tiled TIFF pyramids (SVS, generic and OME TIFF)
        the tiles are decoded directly and kept while neighbouring patches need them (on a grid each
        is decoded once instead of once per patch touching it), several times faster than OpenSlide.
        A level is read this way only after checking, on its first read, that the tile reader gives
        the slide library's own pixels there. Fills `out` when given.
        """
        locations = np.asarray(locations)
        if out is None:
            out = np.empty((len(locations), out_size, out_size, 3), dtype=np.uint8)
        for row, (x, y) in enumerate(locations.tolist()):
            self._patch((int(x), int(y)), size_level0, out_size, fast=True, out=out[row])
        return out

    def _tile_level(self, level: int) -> bool:
        """Whether the direct tile reader serves `level`: checked once per level against the library."""
        if level not in self._tile_checked:
            self._tile_checked[level] = False
            if self.reader in ("openslide", "tiffslide"):
                try:
                    if self._tiles is None:
                        self._tiles = TiffTileReader(self.path, self.level_dimensions)
                    self._tile_checked[level] = self._tiles_agree(level)
                except Exception:  # not a plain tiled TIFF pyramid (or unreadable): the library reads it
                    self._tile_checked = dict.fromkeys(range(self.level_count), False)
        return self._tile_checked[level]

    def _tiles_agree(self, level: int) -> bool:
        """Whether the tile reader gives the library's pixels where tiles meet and at the level's far corner."""
        width, height = self.level_dimensions[level]
        tile_w, tile_h = self._tiles.tile_size(level)
        downsample = self.level_downsamples[level]
        corner = (min(tile_w, width) - 32, min(tile_h, height) - 32)
        for x, y in (corner, (width - 48, height - 48)):
            x, y = max(x, 0), max(y, 0)
            size = (min(64, width - x), min(64, height - y))
            location = (math.ceil(x * downsample - 1e-6), math.ceil(y * downsample - 1e-6))
            expected = self._region(location, level, size, fast=False)
            if not np.array_equal(self._tiles.read(level, x, y, *size), expected):
                return False
        return True

    def read_downsampled(self, downsample: float) -> np.ndarray:
        """The whole slide at `downsample` × level 0, read in strips from the best level (bounded memory)."""
        import cv2

        width, height = self.dimensions
        out_width, out_height = max(1, round(width / downsample)), max(1, round(height / downsample))
        level = self.best_level_for_downsample(downsample)
        level_width, level_height = self.level_dimensions[level]
        level_downsample = self.level_downsamples[level]
        rows_per_out_row = max(1, math.ceil(level_height / out_height))
        strip_rows = max(rows_per_out_row, _STRIP_PIXELS // max(level_width, 1) // rows_per_out_row * rows_per_out_row)
        output = np.empty((out_height, out_width, 3), dtype=np.uint8)
        for row in range(0, level_height, strip_rows):
            end = min(row + strip_rows, level_height)
            out_start, out_end = round(row * out_height / level_height), round(end * out_height / level_height)
            if out_end <= out_start:
                continue
            strip = self.read_region((0, round(row * level_downsample)), level, (level_width, end - row))
            output[out_start:out_end] = cv2.resize(strip, (out_width, out_end - out_start),
                                                   interpolation=cv2.INTER_AREA)
        return output

    def thumbnail(self, max_size: int) -> np.ndarray:
        """The whole slide as RGB with its longer side at most `max_size` pixels (never upscaled)."""
        return self.read_downsampled(max(1.0, max(self.dimensions) / max_size))

    def fingerprint(self) -> str:
        """Cheap content fingerprint of the slide's file(s); see :func:`file_fingerprint`."""
        return file_fingerprint(self.path)

    def close(self) -> None:
        if self._tiles is not None:
            self._tiles.close()
            self._tiles = None
        self._tile_checked = {}
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _openers(path: Path, backend: str) -> list[tuple[str, Callable[[Path], Backend]]]:
    """Backends to try for `path`, in order."""

    def openslide_backend(p: Path) -> Backend:
        import openslide

        return OpenSlideLikeBackend(p, openslide.OpenSlide, "openslide")

    def tiffslide_backend(p: Path) -> Backend:
        import tiffslide

        return OpenSlideLikeBackend(p, tiffslide.TiffSlide, "tiffslide")

    table = {"openslide": openslide_backend, "tiffslide": tiffslide_backend, "image": ImageBackend}
    if backend != "auto":
        return [(backend, table[backend])]
    suffix = path.suffix.lower()
    if suffix in PLAIN_IMAGE_SUFFIXES:
        names = ["image"]
    elif suffix == DICOM_SUFFIX:
        names = ["openslide"]
    else:
        names = ["openslide", "tiffslide", "image"]
    return [(name, table[name]) for name in names]


def _dicom_file(folder: Path) -> Path:
    """Any file of a DICOM-WSI series folder (OpenSlide finds the rest of the series itself)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    dicom = [p for p in files if p.suffix.lower() == DICOM_SUFFIX] or files
    if not dicom:
        raise SlideReadError("slide folder is empty", path=folder,
                             hint="a folder is read as one DICOM-WSI series; point at a slide file otherwise")
    return dicom[0]


def open_slide(path: str | Path, backend: str = "auto", mpp_override: float | None = None,
               slide_id: str | None = None) -> Slide:
    """Open a slide file (or DICOM-WSI series folder) with the first backend that can read it.

    `mpp_override` (µm/px at level 0) replaces the file's own value, for files that lack it.
    """
    if backend not in BACKENDS:
        raise SlideReadError(f"unknown slide backend {backend!r}", hint=f"use one of {', '.join(BACKENDS)}")
    path = Path(path)
    if not path.exists():
        raise SlideReadError("slide file not found", path=path, hint="check the path (relative paths in a CSV "
                                                                     "are relative to the CSV's folder)")
    if mpp_override is not None and _positive_float(mpp_override) is None:
        raise SlideReadError(f"mpp override must be a positive number, got {mpp_override!r}", path=path)
    target = _dicom_file(path) if path.is_dir() else path
    if target.stat().st_size == 0:
        raise SlideReadError("slide file is empty", path=target, hint="copy the file again")
    failures = []
    for name, opener in _openers(target, backend):
        try:
            handle = opener(target)
        except Exception as exc:  # each library signals "not my format" with its own exception types
            failures.append(f"{name}: {str(exc).strip() or type(exc).__name__}")
            continue
        if not handle.level_dimensions or min(handle.level_dimensions[0]) <= 0:
            handle.close()
            failures.append(f"{name}: no image levels")
            continue
        return Slide(path, handle, slide_id or slide_id_from_path(path),
                     None if mpp_override is None else float(mpp_override))
    known = target.suffix.lower() in SLIDE_SUFFIXES | {DICOM_SUFFIX} or path.is_dir()
    reason = "cannot open slide (truncated or corrupt?)" if known else f"unsupported slide format {target.suffix!r}"
    raise SlideReadError(f"{reason}; tried {'; '.join(failures)}", path=path,
                         hint="check the file is complete and a format OpenSlide, tiffslide or tifffile reads"
                         if known else f"convert it to a supported format ({', '.join(sorted(SLIDE_SUFFIXES))})")


@dataclass(frozen=True)
class SlideEntry:
    """One slide to process: its id (names outputs), file, optional mpp override and other CSV columns."""

    slide_id: str
    path: Path
    mpp_override: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _is_dicom_folder(folder: Path) -> bool:
    return any(p.suffix.lower() == DICOM_SUFFIX for p in folder.iterdir() if p.is_file())


def _list_directory(folder: Path) -> list[SlideEntry]:
    if _is_dicom_folder(folder):
        return [SlideEntry(folder.name, folder)]
    entries = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name.endswith(".tmp"):
            continue
        if path.is_dir() and _is_dicom_folder(path):
            entries.append(SlideEntry(path.name, path))
        elif path.is_file() and path.suffix.lower() in SLIDE_SUFFIXES:
            slide_id = slide_id_from_path(path)
            if not slide_id.endswith("_mask"):
                entries.append(SlideEntry(slide_id, path))
    return entries


def _list_csv(csv_path: Path) -> list[SlideEntry]:
    import pandas as pd

    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises several parser error types
        raise DataError(f"cannot read slide CSV ({exc})", path=csv_path, hint="write a CSV with a header row") from exc
    if "path" not in table.columns:
        raise DataError(f"slide CSV needs a `path` column (found {', '.join(table.columns) or 'none'})",
                        path=csv_path, hint="columns: slide_id, path, optional mpp and label columns")
    entries = []
    for row_number, row in enumerate(table.to_dict("records"), start=2):
        raw_path = row.pop("path").strip()
        if not raw_path:
            raise DataError(f"empty path on line {row_number}", path=csv_path, hint="fill in every slide's path")
        path = Path(raw_path).expanduser()
        path = path if path.is_absolute() else csv_path.parent / path
        slide_id = row.pop("slide_id", "").strip() or slide_id_from_path(path)
        mpp_text = row.pop("mpp", "").strip()
        mpp = _positive_float(mpp_text) if mpp_text else None
        if mpp_text and mpp is None:
            raise DataError(f"mpp {mpp_text!r} on line {row_number} is not a positive number", path=csv_path,
                            hint="give microns per pixel at level 0, e.g. 0.25, or leave it empty")
        entries.append(SlideEntry(slide_id, path, mpp, {str(k): str(v) for k, v in row.items()}))
    return entries


def list_slides(dir_or_csv: str | Path) -> list[SlideEntry]:
    """Slides named by a CSV (`slide_id`, `path`, optional `mpp`, any label columns) or found in a folder.

    A folder yields every slide file in it (not `*_mask.*` files) and every sub-folder of DICOM files as
    one slide; a folder of DICOM files is itself one slide.
    """
    source = Path(dir_or_csv)
    if source.is_dir():
        return _list_directory(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return _list_csv(source)
    if source.is_file():
        return [SlideEntry(slide_id_from_path(source), source)]
    raise DataError("slide folder or CSV not found", path=source, hint="pass a folder of slides or a CSV")
