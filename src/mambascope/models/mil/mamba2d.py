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
    """x + Mamba2D(LN(x), mask) on a (1, H, W, dim) grid. In training on a GPU it replays from CUDA
    graphs, one pair per grid shape, at most `cuda_graphs` of them (`models.cuda_graphs`; 0: eager)."""

    def __init__(self, dim: int, d_state: int, expand: int, backend: str, cuda_graphs: int):
        super().__init__()
        from mambascope.ssm import Mamba2D

        self.norm = nn.LayerNorm(dim)
        self.mamba = Mamba2D(dim, d_state=d_state, expand=expand, backend=backend)
        self.graphs = CudaGraphCache(max_graphs=cuda_graphs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.graphs(self.mix, list(self.parameters()), x, mask)

    def mix(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x + self.mamba(self.norm(x), mask)


class Mamba2DMIL(nn.Module):
    """Projection, grid placement, `depth` masked 2D-Mamba layers, LayerNorm, attention pooling, head.

    The defaults are the published 2DMamba-MIL configuration (a 128-wide model, one layer, expand 2,
    16 states: 256 scan channels). `cuda_graphs`: CUDA graphs kept per layer in GPU training (0: none)."""

    def __init__(self, in_dim: int, num_classes: int, dim: int = 128, depth: int = 1, d_state: int = 16,
                 expand: int = 2, attn_dim: int = 128, dropout: float = 0.25, backend: str = "auto",
                 cuda_graphs: int = 8):
        super().__init__()
        self.in_dim = in_dim
        self.embed = projection(in_dim, dim, dropout)
        self.layers = nn.ModuleList(Mamba2DLayer(dim, d_state, expand, backend, cuda_graphs) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pool = AttentionPooling(dim, attn_dim, gated=True, dropout=dropout)
        self.head = nn.Linear(dim, num_classes)

    def grid_multiple(self, device: torch.device | str) -> int:
        """On a GPU grids are padded with masked cells to a few sizes (`grid.padded_size`): rows 16 cells
        wide spare the 2D scan its padding copies, and layers replay a CUDA graph per grid shape;
        elsewhere a grid keeps its size."""
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
        x = canvas.view(1, grid.height, grid.width, -1)
        mask = grid.occupied.view(1, grid.height, grid.width)
        for layer in self.layers:
            x = layer(x, mask)
        # index_select, not x[cells]: its gradient is a plain index_add (the cells are distinct), where
        # advanced indexing's goes through a sorting index_put (~0.25 ms of host time a step)
        tokens = self.norm(x.reshape(grid.height * grid.width, -1).index_select(0, grid.cells))
        pooled, weights = self.pool(tokens)
        scores = weights[grid.inverse]
        return MILOutput(logits=self.head(pooled), scores=scores * grid.share.to(weights.dtype) if shared else scores)


@register_model("mamba2d")
def mamba2d(in_dim: int, num_classes: int, **kwargs) -> Mamba2DMIL:
    """2DMamba-MIL on each slide's own coordinate grid."""
    return Mamba2DMIL(in_dim, num_classes, **kwargs)
