"""Regions of a tiled TIFF pyramid decoded tile by tile with tifffile, each tile decoded once.

Reading a grid of patches through OpenSlide decodes every tile again for each patch that touches it
and pays a slow per-call path; reading the tiles directly (libjpeg-turbo through imagecodecs) and
keeping recently decoded tiles makes neighbouring patches share their tiles. `Slide.read_patches`
uses this only for levels where it has checked that the pixels equal the slide library's own.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from mambascope.slides.backends import quiet_logger

_CACHE_BYTES = 64 << 20  # decoded tiles kept per open slide: a patch row of a wide slide's tile rows


class TiffTileReader:
    """In-bounds RGB regions of the levels of a tiled, 8-bit, 3-sample TIFF pyramid.

    `level_dimensions` are the slide's levels as its library reports them; each must match a tiled
    TIFF page of the file, else the file is refused with ValueError.
    """

    def __init__(self, path: str | Path, level_dimensions: tuple[tuple[int, int], ...],
                 cache_bytes: int = _CACHE_BYTES):
        self._path, self._level_dimensions = Path(path), tuple(level_dimensions)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached_bytes = 0
        self._open()

    def _open(self) -> None:
        """Open the file in this process: a forked child must not share (and move) its parent's file offset."""
        import tifffile

        with quiet_logger("tifffile"):
            self._tif = tifffile.TiffFile(self._path)
        try:
            self._pages = [self._level_page(size) for size in self._level_dimensions]
        except Exception:
            self._tif.close()
            raise
        self._pid = os.getpid()

    def _level_page(self, size: tuple[int, int]) -> Any:
        for series in self._tif.series:
            for level in series.levels:
                page = level.keyframe
                if (page.imagewidth, page.imagelength) == tuple(size) and len(level.pages) == 1:
                    if not (page.is_tiled and page.samplesperpixel == 3 and page.bitspersample == 8
                            and page.planarconfig == 1 and page.imagedepth == 1):
                        raise ValueError(f"level {size} is not a tiled 8-bit RGB page")
                    return level.pages[0]
        raise ValueError(f"no TIFF page of size {size}")

    def _tile(self, level: int, index: int) -> np.ndarray:
        key = (level, index)
        tile = self._cache.get(key)
        if tile is not None:
            self._cache.move_to_end(key)
            return tile
        page = self._pages[level]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if not count:
            raise ValueError(f"tile {index} of level {level} is missing")
        if self._pid != os.getpid():
            self._tif.close()
            self._open()
            page = self._pages[level]
        handle = self._tif.filehandle
        handle.seek(offset)
        data = handle.read(count)
        decoded, _, _ = page.decode(data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader)
        if decoded is None:
            raise ValueError(f"tile {index} of level {level} cannot be decoded")
        tile = decoded.reshape(decoded.shape[-3:])
        self._cache[key] = tile
        self._cached_bytes += tile.nbytes
        while self._cached_bytes > self._cache_bytes and len(self._cache) > 1:
            self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return tile

    def tile_size(self, level: int) -> tuple[int, int]:
        """(width, height) of the tiles of `level`."""
        page = self._pages[level]
        return int(page.tilewidth), int(page.tilelength)

    def read(self, level: int, x: int, y: int, width: int, height: int, out: np.ndarray | None = None) -> np.ndarray:
        """(height, width, 3) pixels at level coordinates (x, y); the region must lie inside the level."""
        page = self._pages[level]
        tile_w, tile_h = page.tilewidth, page.tilelength
        tiles_across = -(-page.imagewidth // tile_w)
        if out is None:
            out = np.empty((height, width, 3), dtype=np.uint8)
        for ty in range(y // tile_h, (y + height - 1) // tile_h + 1):
            top, bottom = max(y, ty * tile_h), min(y + height, (ty + 1) * tile_h)
            for tx in range(x // tile_w, (x + width - 1) // tile_w + 1):
                left, right = max(x, tx * tile_w), min(x + width, (tx + 1) * tile_w)
                tile = self._tile(level, ty * tiles_across + tx)
                out[top - y:bottom - y, left - x:right - x] = \
                    tile[top - ty * tile_h:bottom - ty * tile_h, left - tx * tile_w:right - tx * tile_w]
        return out

    def close(self) -> None:
        self._cache.clear()
        self._tif.close()
