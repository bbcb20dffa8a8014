"""Tile one slide: tissue mask, patch grid at a physical resolution, and every per-slide output.

Outputs under `out_dir` (see design.md): `coords/<id>.h5`, optionally `<id>/patches/<id>_patches.h5`,
`thumbnails/<id>.png` and `contours/<id>.geojson`. The coordinates file is written last, so its
presence (checked together with the others) marks a finished slide.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import mambascope
from mambascope.errors import ConfigError, DataError, MambascopeError
from mambascope.slides.coords_store import coords_path, read_coords, write_coords
from mambascope.slides.geometry import PatchGeometry, grid_coords, patch_geometry
from mambascope.slides.overlays import draw_overview, mask_polygons, write_geojson, write_png
from mambascope.slides.patches_store import patches_complete, patches_path, write_patches
from mambascope.slides.reader import BACKENDS, Slide, SlideEntry, file_fingerprint, open_slide
from mambascope.slides.tissue import TissueParams, detect_tissue, load_user_mask, tissue_fractions

# Tissue-mask resolution: about 16 mask pixels per patch step, the long side between 1024 and 8192 pixels.
_MASK_PIXELS_PER_STEP = 16
_MASK_SIDE_RANGE = (1024, 8192)
DEFAULT_MAGNIFICATION = 20.0
_SAFE_ID = re.compile(r"^[^/\\\x00]+$")


@dataclass(frozen=True)
class TilingConfig:
    """Everything that decides a slide's patches; stored in each coordinates file to detect stale outputs."""

    patch_size: int = 256
    magnification: float | None = None  # 20x when neither magnification nor mpp is given
    mpp: float | None = None
    overlap: int = 0
    tissue_threshold: float = 0.5
    allow_upsample: bool = False
    mask_dir: Path | None = None
    save_patches: bool = False
    backend: str = "auto"
    thumbnail_size: int = 1024
    tissue: TissueParams = field(default_factory=TissueParams)

    def __post_init__(self) -> None:
        if self.magnification is not None and self.mpp is not None:
            raise ConfigError("give a target magnification or mpp, not both")
        if self.magnification is None and self.mpp is None:
            object.__setattr__(self, "magnification", DEFAULT_MAGNIFICATION)
        if (self.magnification or 1.0) <= 0 or (self.mpp or 1.0) <= 0:
            raise ConfigError("target magnification and mpp must be positive")
        if self.patch_size < 1 or not 0 <= self.overlap < self.patch_size:
            raise ConfigError(f"need patch size >= 1 and 0 <= overlap < patch size, got {self.patch_size}, "
                              f"{self.overlap}", hint="overlap is in pixels at the target resolution")
        if not 0.0 <= self.tissue_threshold <= 1.0:
            raise ConfigError(f"tissue threshold must be in 0..1, got {self.tissue_threshold}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown slide backend {self.backend!r}", hint=f"use one of {', '.join(BACKENDS)}")

    def signature(self, mpp_override: float | None) -> str:
        """JSON of the settings that change the coordinates (not output options like thumbnail size)."""
        keys = ("patch_size", "magnification", "mpp", "overlap", "tissue_threshold", "allow_upsample", "backend")
        values: dict[str, Any] = {key: getattr(self, key) for key in keys}
        values["tissue"] = asdict(self.tissue)
        values["mask_dir"] = None if self.mask_dir is None else str(self.mask_dir)
        values["mpp_override"] = mpp_override
        return json.dumps(values, sort_keys=True)


@dataclass(frozen=True)
class SlideOutputs:
    """Paths of one slide's outputs."""

    coords: Path
    patches: Path
    thumbnail: Path
    contours: Path

    @classmethod
    def for_slide(cls, out_dir: str | Path, slide_id: str) -> SlideOutputs:
        out_dir = Path(out_dir)
        return cls(coords=coords_path(out_dir, slide_id), patches=patches_path(out_dir, slide_id),
                   thumbnail=out_dir / "thumbnails" / f"{slide_id}.png",
                   contours=out_dir / "contours" / f"{slide_id}.geojson")


@dataclass
class SlideResult:
    """How one slide went: `tiled`, `skipped` (complete outputs found) or `failed` with the error line."""

    slide_id: str
    path: str
    status: str
    num_patches: int | None = None
    mpp: float | None = None
    magnification: float | None = None
    reader: str | None = None
    patch_size_level0: int | None = None
    error: str = ""
    seconds: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """One `processed_metadata.csv` row: the input columns, then what tiling found."""
        return {"slide_id": self.slide_id, "path": self.path, **self.extra, "num_patches": self.num_patches,
                "mpp": self.mpp, "magnification": self.magnification, "reader": self.reader,
                "patch_size_level0": self.patch_size_level0, "status": self.status, "error": self.error,
                "seconds": round(self.seconds, 3)}


def check_slide_id(slide_id: str, out_dir: str | Path) -> None:
    """Refuse ids that are empty, hidden, or would put outputs outside `out_dir` (`../x`, `a/b`)."""
    out_dir = Path(out_dir).resolve()
    target = (out_dir / "coords" / f"{slide_id}.h5").resolve()
    if (not _SAFE_ID.match(slide_id) or slide_id.startswith(".") or slide_id != slide_id.strip()
            or target.parent != out_dir / "coords"):
        raise DataError(f"slide id {slide_id!r} would escape the output folder or is not a plain file name",
                        hint="use slide ids without path separators, leading dots or surrounding spaces")


def mask_downsample(dimensions: tuple[int, int], step_level0: int) -> float:
    """Level-0 pixels per tissue-mask pixel (see `_MASK_PIXELS_PER_STEP`, `_MASK_SIDE_RANGE`)."""
    longest = max(dimensions)
    wanted = step_level0 / _MASK_PIXELS_PER_STEP
    bounded = min(max(wanted, longest / _MASK_SIDE_RANGE[1]), longest / _MASK_SIDE_RANGE[0])
    return max(1.0, bounded)


def user_mask_path(mask_dir: Path, slide_id: str) -> Path:
    """`<mask_dir>/<slide_id>_mask.png`."""
    return Path(mask_dir) / f"{slide_id}_mask.png"


def coords_attrs(slide: Slide, geometry: PatchGeometry, config: TilingConfig, fingerprint: str,
                 tissue_source: str, signature: str) -> dict[str, Any]:
    """Attributes of the coordinates dataset: mambascope's, CLAM's and TRIDENT's names."""
    level = geometry.patch_level
    level_downsample = slide.level_downsamples[level]
    return {
        "patch_size": geometry.patch_size,
        "patch_size_level0": geometry.patch_size_level0,
        "step_size_level0": geometry.step_level0,
        "patch_level": level,
        "target_magnification": geometry.target_magnification,
        "target_mpp": geometry.target_mpp,
        "level0_mpp": geometry.level0_mpp,
        "level0_magnification": geometry.level0_magnification,
        "level0_width": slide.dimensions[0],
        "level0_height": slide.dimensions[1],
        "overlap": geometry.overlap,
        "reader": slide.reader,
        "slide_fingerprint": fingerprint,
        "mambascope_version": mambascope.__version__,
        "tissue_threshold": config.tissue_threshold,
        "tissue_source": tissue_source,
        "tiling_config": signature,
        "name": slide.slide_id,  # CLAM and TRIDENT
        "downsample": np.array([level_downsample, level_downsample]),  # CLAM
        "level_dim": np.array(slide.level_dimensions[level]),  # CLAM
        "downsampled_level_dim": np.array(slide.level_dimensions[level]),  # CLAM
    }


def outputs_complete(outputs: SlideOutputs, config: TilingConfig, signature: str, fingerprint: str) -> int | None:
    """The patch count when every output of this slide exists, opens and matches the settings; else None."""
    try:
        coords, attrs = read_coords(outputs.coords)
    except MambascopeError:
        return None
    if attrs.get("tiling_config") != signature or attrs.get("slide_fingerprint") != fingerprint:
        return None
    if not (outputs.thumbnail.is_file() and outputs.contours.is_file()):
        return None
    try:
        json.loads(outputs.contours.read_text())
    except (OSError, ValueError):
        return None
    if config.save_patches and not patches_complete(outputs.patches, len(coords), config.patch_size):
        return None
    return len(coords)


def _tissue_mask(slide: Slide, overview: np.ndarray, config: TilingConfig) -> tuple[np.ndarray, str]:
    """The user's mask when `mask_dir` is set, else automatic detection; and where it came from."""
    if config.mask_dir is not None:
        path = user_mask_path(config.mask_dir, slide.slide_id)
        if not path.is_file():
            raise DataError("tissue mask not found", path=path,
                            hint="name masks <slide_id>_mask.png in --mask-dir, or drop --mask-dir")
        return load_user_mask(path, overview.shape[:2], slide.dimensions), str(path)
    um_per_px = (slide.mpp or 1.0) * slide.dimensions[0] / overview.shape[1]
    return detect_tissue(overview, um_per_px, config.tissue), "auto"


def _thumbnail(overview: np.ndarray, max_size: int) -> np.ndarray:
    import cv2

    scale = max_size / max(overview.shape[:2])
    if scale >= 1:
        return overview
    size = (max(1, round(overview.shape[1] * scale)), max(1, round(overview.shape[0] * scale)))
    return cv2.resize(overview, size, interpolation=cv2.INTER_AREA)


def select_patches(mask: np.ndarray, dimensions: tuple[int, int], geometry: PatchGeometry,
                   tissue_threshold: float) -> np.ndarray:
    """Grid patches whose tissue fraction (by area) is at least `tissue_threshold` (and above zero)."""
    coords = grid_coords(dimensions, geometry)
    fractions = tissue_fractions(mask, coords, geometry.patch_size_level0, dimensions)
    return coords[(fractions >= tissue_threshold) & (fractions > 0)]


def tile_slide(entry: SlideEntry, out_dir: str | Path, config: TilingConfig, overwrite: bool = False) -> SlideResult:
    """Tile one slide and write its outputs; skip it when complete outputs for these settings exist.

    Raises MambascopeError subclasses for bad input (`tile_slide_recorded` records them instead).
    """
    result = SlideResult(entry.slide_id, str(entry.path), "tiled", extra=dict(entry.extra))
    _tile_into(result, entry, out_dir, config, overwrite)
    return result


def tile_slide_recorded(entry: SlideEntry, out_dir: str | Path, config: TilingConfig,
                        overwrite: bool = False) -> SlideResult:
    """`tile_slide`, with any failure recorded in the result instead of raised (one slide never stops a batch)."""
    result = SlideResult(entry.slide_id, str(entry.path), "tiled", extra=dict(entry.extra))
    started = time.perf_counter()
    try:
        _tile_into(result, entry, out_dir, config, overwrite)
    except MambascopeError as exc:
        result.status, result.error = "failed", exc.one_line()
    except Exception as exc:  # a library crashing on a strange file must not stop the other slides
        result.status, result.error = "failed", f"unexpected error while tiling ({type(exc).__name__}: {exc})"
    if result.status == "failed":
        result.num_patches, result.seconds = None, time.perf_counter() - started
    return result


def _tile_into(result: SlideResult, entry: SlideEntry, out_dir: str | Path, config: TilingConfig,
               overwrite: bool) -> None:
    """The tiling steps; fills `result` as facts become known, so a failure still reports what was learnt."""
    started = time.perf_counter()
    check_slide_id(entry.slide_id, out_dir)
    outputs = SlideOutputs.for_slide(out_dir, entry.slide_id)
    with open_slide(entry.path, backend=config.backend, mpp_override=entry.mpp_override,
                    slide_id=entry.slide_id) as slide:
        result.mpp, result.magnification, result.reader = slide.mpp, slide.magnification, slide.reader
        geometry = patch_geometry(slide, config.patch_size, magnification=config.magnification, mpp=config.mpp,
                                  overlap=config.overlap, allow_upsample=config.allow_upsample)
        result.patch_size_level0 = geometry.patch_size_level0
        fingerprint = file_fingerprint(entry.path)
        signature = config.signature(entry.mpp_override)
        done = None if overwrite else outputs_complete(outputs, config, signature, fingerprint)
        if done is not None:
            result.status, result.num_patches = "skipped", done
            result.seconds = time.perf_counter() - started
            return
        overview = slide.read_downsampled(mask_downsample(slide.dimensions, geometry.step_level0))
        mask, tissue_source = _tissue_mask(slide, overview, config)
        if not mask.any():
            raise DataError("no tissue found on the slide", path=entry.path,
                            hint="check the slide is not blank; give a mask with --mask-dir if detection fails")
        coords = select_patches(mask, slide.dimensions, geometry, config.tissue_threshold)
        if len(coords) == 0:
            tissue_mm2 = mask.mean() * slide.dimensions[0] * slide.dimensions[1] * geometry.level0_mpp**2 / 1e6
            raise DataError(f"no patch has at least {config.tissue_threshold:.0%} tissue (tissue area "
                            f"{tissue_mm2:.3g} mm², patch side {geometry.patch_size * geometry.target_mpp:.0f} µm)",
                            path=entry.path, hint="lower --tissue-threshold or the patch size")
        attrs = coords_attrs(slide, geometry, config, fingerprint, tissue_source, signature)
        if config.save_patches:
            write_patches(outputs.patches, slide, coords, geometry.patch_size, geometry.patch_size_level0, attrs)
        polygons = mask_polygons(mask, slide.dimensions)
        write_geojson(outputs.contours, polygons)
        overview_png = draw_overview(_thumbnail(overview, config.thumbnail_size), slide.dimensions, polygons,
                                     coords, geometry.patch_size_level0)
        write_png(outputs.thumbnail, overview_png)
        write_coords(outputs.coords, coords, attrs)
    result.status, result.num_patches = "tiled", len(coords)
    result.seconds = time.perf_counter() - started
