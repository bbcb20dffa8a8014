"""Patch grids from a slide's own coordinates: where each patch sits on a compact 2D lattice.

The lattice step is the most common gap between neighbouring patches of one row (same y) or one
column (same x), so it follows the tiler's stride at whatever magnification and overlap — no fixed
canvas per dataset — and is not fooled by tissue pieces tiled from different origins (CLAM contours).
Runs of empty rows or columns (gaps between tissue pieces) shrink to a single empty line, which
keeps the grid about the size of the tissue. Patches from offset lattices that round to one cell
share it.

The grid is host work: its sizes decide allocations, so on a GPU every step of it (unique, max,
boolean selection) would stall the device queue. `patch_grid` runs on the CPU and
`PatchGrid.to` hands the index tensors to the device without a synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from mambascope.errors import DataError

#: a grid may hold at most this many cells per patch (beyond a floor), else the layout is not 2D tissue
MAX_CELLS_PER_PATCH = 64
_MIN_CELL_BUDGET = 1 << 20


# the grid's arrays, back to back in one byte buffer: (name, dtype, length: "patches" or "grid");
# the 8-byte parts come first, so every part starts aligned to its element size
_PARTS = (("cell", torch.int64, "patches"), ("share", torch.float32, "patches"), ("occupied", torch.bool, "grid"))
_NUMPY_DTYPES = {torch.int64: np.int64, torch.float32: np.float32, torch.bool: np.bool_}


def _part_view(name: str) -> cached_property:
    """A PatchGrid attribute: the view of its buffer that holds part `name`, made on first use."""
    return cached_property(lambda grid: grid._part(name))


@dataclass(frozen=True, eq=False)
class PatchGrid:
    """`cell` (N,) flat cell of each patch on an `height` × `width` grid, `num_cells` of them distinct;
    `occupied` (height × width,) bool marks the cells with patches and `share` (N,) float32 is each
    patch's share of its cell, 1 / the number of patches in it (both made here so a device need not
    derive them).

    The arrays are views of one byte `buffer`, so a grid travels as one tensor: from DataLoader workers
    to the training process (each tensor costs that process a shared-memory handle and a pinned
    copy) and from host to GPU (one copy instead of six)."""

    height: int
    width: int
    num_patches: int
    num_cells: int
    buffer: torch.Tensor

    def _part(self, name: str) -> torch.Tensor:
        lengths = {"patches": self.num_patches, "grid": self.height * self.width}
        start = 0
        for part, dtype, length in _PARTS:
            size = lengths[length] * dtype.itemsize
            if part == name:
                return self.buffer[start:start + size].view(dtype)
            start += size
        raise KeyError(name)

    cell = _part_view("cell")
    share = _part_view("share")
    occupied = _part_view("occupied")

    def _moved(self, buffer: torch.Tensor) -> PatchGrid:
        return PatchGrid(self.height, self.width, self.num_patches, self.num_cells, buffer)

    def to(self, device: torch.device | str) -> PatchGrid:
        """The same grid on `device` (the host-to-device copy does not wait on the device's queue)."""
        return self._moved(self.buffer.to(device, non_blocking=True))

    def pin_memory(self) -> PatchGrid:
        """The same grid in page-locked host memory (a DataLoader with `pin_memory=True` calls this),
        from which copies to a GPU run asynchronously."""
        return self._moved(self.buffer.pin_memory())


def _packed(height: int, width: int, num_cells: int, arrays: dict[str, np.ndarray]) -> PatchGrid:
    """A PatchGrid whose buffer holds `arrays` (keyed by part name) in `_PARTS` order."""
    chunks = [np.ascontiguousarray(arrays[name], dtype=_NUMPY_DTYPES[dtype]).view(np.uint8) for name, dtype, _ in _PARTS]
    return PatchGrid(height, width, len(arrays["cell"]), num_cells, torch.from_numpy(np.concatenate(chunks)))


def _host_axes(coords: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x and y as contiguous int64 NumPy arrays (one copy from a device)."""
    if isinstance(coords, torch.Tensor):
        coords = coords.detach().cpu().numpy()
    coords = np.asarray(coords, dtype=np.int64)
    return np.ascontiguousarray(coords[:, 0]), np.ascontiguousarray(coords[:, 1])


def _line_gaps(along: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Gaps between consecutive patches that share the other coordinate (same row or same column)."""
    order = np.argsort(other * (along.max() + 1) + along)
    along, other = along[order], other[order]
    return (along[1:] - along[:-1])[other[1:] == other[:-1]]


def lattice_step(coords: torch.Tensor | np.ndarray) -> int:
    """The tiling stride: the most frequent gap between row or column neighbours (ties: the smaller).

    Without neighbours on any line (e.g. scattered patches), the most frequent gap between distinct
    x or y values stands in; a single patch has step 1.
    """
    return _axes_step(*_host_axes(coords))


def _axes_step(x: np.ndarray, y: np.ndarray) -> int:
    gaps = np.concatenate([_line_gaps(x, y), _line_gaps(y, x)])
    gaps = gaps[gaps > 0]
    if gaps.size == 0:
        gaps = np.concatenate([np.diff(np.unique(axis)) for axis in (x, y)])
    if gaps.size == 0:
        return 1
    values, counts = np.unique(gaps, return_counts=True)
    return int(values[counts.argmax()])


def dense_ids(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values sorted, each value's index among them) for non-negative integers.

    `np.unique` sorts or hashes: ~100 µs for a bag's 8,000 cells. Lattice indices span a small range,
    where a presence table and its running count give the same answer in a tenth of the time; values
    spread far wider than their count (scattered coordinates) take `np.unique`.
    """
    top = int(values.max())
    if top > 16 * values.size + 4096:
        return np.unique(values, return_inverse=True)
    present = np.bincount(values, minlength=top + 1) > 0
    return np.flatnonzero(present), (np.cumsum(present) - 1)[values]


def _axis_positions(values: np.ndarray, step: int) -> np.ndarray:
    """Lattice index of each value along one axis, with long empty runs shrunk to one empty line."""
    occupied, ids = dense_ids((values - values.min() + step // 2) // step)
    compact = np.zeros_like(occupied)
    compact[1:] = np.cumsum(np.minimum(np.diff(occupied), 2))
    return compact[ids]


def padded_size(n: int, multiple: int, steps: int = 16) -> int:
    """n rounded up to a multiple of `multiple`, with the step doubling each time n passes `steps` steps
    (for 16 and 16 steps: 16, 32, ..., 256, 288, ..., 512, 576, ...), or n itself for 1. Sizes of similar
    slides then repeat, each at most 2/`steps` longer than n: the GPU replays a captured model per
    shape (`models.cuda_graphs`; mamba2d's grid sides, mambamil's bag lengths), and the 2D scan wants
    rows 16-aligned."""
    if multiple == 1:
        return n
    step = multiple
    while n > steps * step:
        step *= 2
    return -(-n // step) * step


def patch_grid(coords: torch.Tensor | np.ndarray | None, num_patches: int, multiple: int = 1) -> PatchGrid:
    """Grid placement of a bag's patches, on the host (coords on a device are copied over once);
    without coords, row-major on a square in bag order. Height and width are rounded up by
    `padded_size(·, multiple)` with empty rows below and empty columns on the right."""
    if coords is None:
        cols_used = math.ceil(math.sqrt(num_patches))
        rows, cols = np.divmod(np.arange(num_patches), cols_used)
    else:
        x, y = _host_axes(coords)
        step = _axes_step(x, y)
        cols, rows = _axis_positions(x, step), _axis_positions(y, step)
        cols_used = int(cols.max()) + 1
    rows_used = int(rows.max()) + 1
    height, width = padded_size(rows_used, multiple), padded_size(cols_used, multiple)
    if coords is not None and rows_used * cols_used > max(MAX_CELLS_PER_PATCH * num_patches, _MIN_CELL_BUDGET):
        raise DataError(f"patch coordinates do not form a 2D tissue grid ({rows_used}×{cols_used} cells for "
                        f"{num_patches} patches)", hint="check the coords, or use a sequence model (mambamil)")
    cell = rows * width + cols
    cells, inverse = dense_ids(cell)
    occupied = np.zeros(height * width, dtype=bool)
    occupied[cells] = True
    share = 1.0 / np.bincount(inverse)[inverse]
    return _packed(height, width, len(cells), {"cell": cell, "share": share, "occupied": occupied})
