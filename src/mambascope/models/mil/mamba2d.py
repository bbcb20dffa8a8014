"""2DMamba-MIL (Zhang et al. 2025): a 2D selective scan over the slide's own patch grid.

Projected patch features are placed on the grid built from the bag's coordinates (`grid.patch_grid`;
patches sharing a cell are averaged), mixed by residual `Mamba2D` layers whose mask marks non-tissue
cells (they neither feed nor receive the scan), normalised, and pooled with gated attention over the
real cells only. A patch's score is its cell's attention weight split among the patches in the cell.
The grid is host work; a loader may build it ahead of the step and pass it in (`BagDataset`).
"""

from __future__ import annotations

import torch
from torch import nn

from mambascope.errors import DataError
from mambascope.models.cuda_graphs import CudaGraphCache
from mambascope.models.mil.grid import PatchGrid, patch_grid
from mambascope.models.mil.layers import AttentionPooling, projection
from mambascope.models.mil.output import MILOutput, check_bag
from mambascope.models.registry import register_model


class Mamba2DLayer(nn.Module):
    """x + Mamba2D(LN(x), mask) on a (1, H, W, dim) grid."""

    def __init__(self, dim: int, d_state: int, expand: int, backend: str):
        super().__init__()
        from mambascope.ssm import Mamba2D

        self.norm = nn.LayerNorm(dim)
        self.mamba = Mamba2D(dim, d_state=d_state, expand=expand, backend=backend)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x + self.mamba(self.norm(x), mask)


class Mamba2DMIL(nn.Module):
    """Projection, grid placement, `depth` masked 2D-Mamba layers, LayerNorm, attention pooling, head.

    The defaults are the published 2DMamba-MIL configuration (a 128-wide model, one layer, expand 2,
    16 states: 256 scan channels). Everything after the placement works on the whole grid, empty cells
    masked, so its shapes are the grid's: in GPU training it replays from CUDA graphs, one pair per grid
    shape, at most `cuda_graphs` of them (`models.cuda_graphs`; 0: eager)."""

    def __init__(self, in_dim: int, num_classes: int, dim: int = 128, depth: int = 1, d_state: int = 16,
                 expand: int = 2, attn_dim: int = 128, dropout: float = 0.25, backend: str = "auto",
                 cuda_graphs: int = 8):
        super().__init__()
        self.in_dim = in_dim
        self.embed = projection(in_dim, dim, dropout)
        self.layers = nn.ModuleList(Mamba2DLayer(dim, d_state, expand, backend) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pool = AttentionPooling(dim, attn_dim, gated=True, dropout=dropout)
        self.head = nn.Linear(dim, num_classes)
        self.graphs = CudaGraphCache(max_graphs=cuda_graphs)

    def grid_multiple(self, device: torch.device | str) -> int:
        """On a GPU grids are padded with masked cells to a few sizes (`grid.padded_size`): rows 16 cells
        wide spare the 2D scan its padding copies, and a CUDA graph replays per grid shape; elsewhere a
        grid keeps its size."""
        return 16 if torch.device(device).type == "cuda" else 1

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None,
                grid: PatchGrid | None = None) -> MILOutput:
        """`grid`: the bag's placement when built ahead of the step, e.g. by the DataLoader workers
        (`BagDataset(grid_multiple=…)`); else it is built here from `coords`."""
        check_bag(features, coords, self.in_dim)
        if grid is not None and grid.num_patches != features.shape[0]:
            raise DataError(f"the patch grid places {grid.num_patches} patches but the bag has {features.shape[0]}",
                            hint="build the grid from this bag's coords (patch_grid(coords, len(features)))")
        h = self.embed(features)
        if grid is None:
            grid = patch_grid(coords, features.shape[0], multiple=self.grid_multiple(h.device))
        grid = grid.to(h.device)
        # each cell holds the mean of its patches: every patch adds its share of the cell (when every
        # patch has a cell of its own, known on the host, the shares are 1 and their products are skipped)
        shared = grid.num_cells < grid.num_patches
        placed = h * grid.share.unsqueeze(1).to(h.dtype) if shared else h
        canvas = h.new_zeros(grid.height * grid.width, h.shape[1]).index_add_(0, grid.cell, placed)
        logits, cell_weights = self.graphs(self, self._on_grid, canvas.view(1, grid.height, grid.width, -1),
                                           grid.occupied.view(1, grid.height, grid.width))
        # index_select, not cell_weights[cell]: its gradient is a plain index_add, where advanced
        # indexing's goes through a sorting index_put
        scores = cell_weights.index_select(0, grid.cell)
        return MILOutput(logits=logits, scores=scores * grid.share.to(scores.dtype) if shared else scores)

    def _on_grid(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and per-cell attention weights (0 on empty cells) of a placed (1, H, W, dim) grid."""
        for layer in self.layers:
            x = layer(x, mask)
        pooled, weights = self.pool(self.norm(x.reshape(-1, x.shape[-1])), mask.reshape(-1))
        return self.head(pooled), weights


@register_model("mamba2d")
def mamba2d(in_dim: int, num_classes: int, **kwargs) -> Mamba2DMIL:
    """2DMamba-MIL on each slide's own coordinate grid."""
    return Mamba2DMIL(in_dim, num_classes, **kwargs)
