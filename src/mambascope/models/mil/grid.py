"""Patch grids from a slide's own coordinates: where each patch sits on a compact 2D lattice.

The lattice step is the most common gap between neighbouring patches of one row (same y) or one
column (same x), so it follows the tiler's stride at whatever magnification and overlap — no fixed
canvas per dataset — and is not fooled by tissue pieces tiled from different origins (CLAM contours).
Runs of empty rows or columns (gaps between tissue pieces) shrink to a single empty line, which
keeps the grid about the size of the tissue. Patches from offset lattices that round to one cell
share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mambascope.errors import DataError

#: a grid may hold at most this many cells per patch (beyond a floor), else the layout is not 2D tissue
MAX_CELLS_PER_PATCH = 64
_MIN_CELL_BUDGET = 1 << 20


@dataclass(frozen=True)
class PatchGrid:
    """`cell` (N,) flat cell of each patch on an `height` × `width` grid; `cells` the distinct occupied
    cells (M,), `inverse` (N,) each patch's position in `cells`, `counts` (M,) patches per cell."""

    height: int
    width: int
    cell: torch.Tensor
    cells: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor


def _line_gaps(coords: torch.Tensor, along: int) -> torch.Tensor:
    """Gaps between consecutive patches that share the other coordinate (same row or same column)."""
    other = 1 - along
    key = coords[:, other] * (coords[:, along].max() + 1) + coords[:, along]
    ordered = coords[torch.argsort(key)]
    same_line = ordered[1:, other] == ordered[:-1, other]
    return (ordered[1:, along] - ordered[:-1, along])[same_line]


def lattice_step(coords: torch.Tensor) -> int:
    """The tiling stride: the most frequent gap between row or column neighbours (ties: the smaller).

    Without neighbours on any line (e.g. scattered patches), the most frequent gap between distinct
    x or y values stands in; a single patch has step 1.
    """
    gaps = torch.cat([_line_gaps(coords, 0), _line_gaps(coords, 1)])
    gaps = gaps[gaps > 0]
    if gaps.numel() == 0:
        distinct = [torch.unique(coords[:, axis]) for axis in (0, 1)]
        gaps = torch.cat([d[1:] - d[:-1] for d in distinct])
    if gaps.numel() == 0:
        return 1
    values, counts = torch.unique(gaps, return_counts=True)
    return int(values[counts.argmax()])


def _axis_positions(values: torch.Tensor, step: int) -> torch.Tensor:
    """Lattice index of each value along one axis, with long empty runs shrunk to one empty line."""
    index = torch.div(values - values.min() + step // 2, step, rounding_mode="floor")
    occupied = torch.unique(index)
    compact = torch.zeros_like(occupied)
    if occupied.numel() > 1:
        compact[1:] = torch.cumsum((occupied[1:] - occupied[:-1]).clamp(max=2), 0)
    return compact[torch.searchsorted(occupied, index)]


def patch_grid(coords: torch.Tensor | None, num_patches: int) -> PatchGrid:
    """Grid placement of a bag's patches; without coords, row-major on a square in bag order."""
    device = None if coords is None else coords.device
    if coords is None:
        width = math.ceil(math.sqrt(num_patches))
        cell = torch.arange(num_patches)
        height = math.ceil(num_patches / width)
    else:
        coords = coords.long()
        step = lattice_step(coords)
        cols, rows = _axis_positions(coords[:, 0], step), _axis_positions(coords[:, 1], step)
        height, width = int(rows.max()) + 1, int(cols.max()) + 1
        if height * width > max(MAX_CELLS_PER_PATCH * num_patches, _MIN_CELL_BUDGET):
            raise DataError(f"patch coordinates do not form a 2D tissue grid ({height}×{width} cells for "
                            f"{num_patches} patches)", hint="check the coords, or use a sequence model (mambamil)")
        cell = rows * width + cols
    cells, inverse, counts = torch.unique(cell, return_inverse=True, return_counts=True)
    if device is not None:
        cell, cells, inverse, counts = (t.to(device) for t in (cell, cells, inverse, counts))
    return PatchGrid(height, width, cell, cells, inverse, counts)
