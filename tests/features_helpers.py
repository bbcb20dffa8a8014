"""Shared set-up for the features tests: slide folders built from the real Aperio SVS, with coords files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mambascope.sample_data import sample_path
from mambascope.slides.coords_store import write_coords
from mambascope.slides.reader import open_slide

SVS = sample_path("CMU-1-Small-Region.svs")
#: a tiny timm model (160 px input, 64-d) so CPU tests stay fast; weights `none` everywhere: no downloads
TINY_BACKBONE = "timm:test_vit"
PATCH = 256


def grid(count: int, offset: int = 0, patch: int = PATCH) -> np.ndarray:
    """`count` row-major patch positions of the SVS (2220 x 2967), starting at grid cell `offset`."""
    xs = np.arange(0, 2220 - patch + 1, patch)
    ys = np.arange(0, 2967 - patch + 1, patch)
    cells = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2).astype(np.int64)
    return cells[offset:offset + count]


def write_slide_coords(slide_path: Path, coords_file: Path, coords: np.ndarray,
                       fingerprint: str | None = None) -> None:
    """A coordinates file as `mambascope tile` writes it (20x, 256 px, level 0) for `slide_path`."""
    with open_slide(slide_path) as slide:
        attrs = {"patch_size": PATCH, "patch_size_level0": PATCH, "patch_level": 0, "target_magnification": 20.0,
                 "level0_mpp": slide.mpp, "level0_width": slide.dimensions[0], "level0_height": slide.dimensions[1],
                 "overlap": 0, "reader": slide.reader, "slide_fingerprint": fingerprint or slide.fingerprint()}
    write_coords(coords_file, coords, attrs)


def make_slide_set(root: Path, slide_ids: list[str], patches_per_slide: int, source: Path = SVS) -> tuple[Path, Path]:
    """`root/slides/<id>.svs` (links to the real SVS) and `root/tiles/coords/<id>.h5`, each slide with its
    own part of the patch grid so their features differ. Returns (slides folder, tiling output folder)."""
    slides, tiles = root / "slides", root / "tiles"
    slides.mkdir(parents=True, exist_ok=True)
    for index, slide_id in enumerate(slide_ids):
        link = slides / f"{slide_id}.svs"
        link.symlink_to(source)
        write_slide_coords(link, tiles / "coords" / f"{slide_id}.h5", grid(patches_per_slide, offset=3 * index))
    return slides, tiles


def corrupt_tile_copy(target: Path, tile_index: int) -> tuple[int, int]:
    """Copy the SVS with one JPEG tile's bytes zeroed; return that tile's level-0 top-left (x, y)."""
    import tifffile

    with tifffile.TiffFile(SVS) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[tile_index], page.databytecounts[tile_index]
        tile_width, tile_height = page.tilewidth, page.tilelength
        tiles_across = -(-page.imagewidth // tile_width)
    data = bytearray(SVS.read_bytes())
    data[offset:offset + count] = bytes(count)
    target.write_bytes(bytes(data))
    return (tile_index % tiles_across) * tile_width, (tile_index // tiles_across) * tile_height
