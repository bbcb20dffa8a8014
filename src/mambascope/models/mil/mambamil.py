"""MambaMIL with SR-MambaMIL's sequence reordering (Yang et al. 2024).

Patch features are projected and mixed by residual Mamba layers over the bag's sequence (file order,
i.e. the tiler's raster order). Each layer adds a second Mamba branch that scans the sequence
reordered with rate R — positions i, i+R, i+2R, ... become neighbours — so distant patches interact
within one scan; its output is put back in the original order and summed with the plain branch.
The mixed tokens are normalised and pooled with gated attention, whose weights are the patch scores.
"""

from __future__ import annotations

import torch
from torch import nn

from mambascope.models.mil.layers import AttentionPooling, projection
from mambascope.models.mil.output import MILOutput, check_bag
from mambascope.models.registry import register_model


def reorder_permutation(length: int, rate: int, device: torch.device | None = None) -> torch.Tensor:
    """Positions of the rate-R reordering: 0, R, 2R, ..., then 1, R+1, ..., (any length, no padding)."""
    positions = torch.arange(length, device=device)
    return torch.argsort((positions % rate) * length + positions)


class SRMambaLayer(nn.Module):
    """x + Mamba(LN(x)) + unreorder(Mamba_sr(reorder(LN(x))))."""

    def __init__(self, dim: int, d_state: int, reorder_rate: int, bidirectional: bool, backend: str):
        super().__init__()
        from mambascope.ssm import Mamba

        self.norm = nn.LayerNorm(dim)
        self.mamba = Mamba(dim, d_state=d_state, bidirectional=bidirectional, backend=backend)
        self.reorder_rate = reorder_rate
        self.mamba_sr = (Mamba(dim, d_state=d_state, bidirectional=bidirectional, backend=backend)
                         if reorder_rate > 1 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        y = self.mamba(h)
        if self.mamba_sr is not None and x.shape[1] > 1:
            perm = reorder_permutation(x.shape[1], self.reorder_rate, x.device)
            y = y + self.mamba_sr(h[:, perm])[:, torch.argsort(perm)]
        return x + y


class MambaMIL(nn.Module):
    """Projection, `depth` SR-Mamba layers, LayerNorm, gated attention pooling, linear head."""

    def __init__(self, in_dim: int, num_classes: int, dim: int = 512, depth: int = 2, d_state: int = 16,
                 reorder_rate: int = 10, bidirectional: bool = False, attn_dim: int = 128, dropout: float = 0.25,
                 backend: str = "auto"):
        super().__init__()
        self.in_dim = in_dim
        self.embed = projection(in_dim, dim, dropout)
        self.layers = nn.ModuleList(SRMambaLayer(dim, d_state, reorder_rate, bidirectional, backend)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pool = AttentionPooling(dim, attn_dim, gated=True, dropout=dropout)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        check_bag(features, coords, self.in_dim)
        h = self.embed(features).unsqueeze(0)
        for layer in self.layers:
            h = layer(h)
        pooled, weights = self.pool(self.norm(h[0]))
        return MILOutput(logits=self.head(pooled), scores=weights)


@register_model("mambamil")
def mambamil(in_dim: int, num_classes: int, **kwargs) -> MambaMIL:
    """SR-MambaMIL (reorder_rate=1 gives plain MambaMIL)."""
    return MambaMIL(in_dim, num_classes, **kwargs)
