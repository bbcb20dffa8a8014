"""Attention-based MIL (Ilse et al. 2018) with the CLAM-style 1024 → 512 → 256 widths."""

from __future__ import annotations

import torch
from torch import nn

from mambascope.models.mil.layers import AttentionPooling, projection
from mambascope.models.mil.output import MILOutput, check_bag
from mambascope.models.registry import register_model


class ABMIL(nn.Module):
    """Project instances, pool them with (gated) attention, classify the pooled vector."""

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int = 512, attn_dim: int = 256,
                 dropout: float = 0.25, gated: bool = False):
        super().__init__()
        self.in_dim = in_dim
        self.embed = projection(in_dim, hidden_dim, dropout)
        self.pool = AttentionPooling(hidden_dim, attn_dim, gated=gated, dropout=dropout)
        self.head = nn.Linear(hidden_dim, num_classes)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        check_bag(features, coords, self.in_dim)
        pooled, weights = self.pool(self.embed(features))
        return MILOutput(logits=self.head(pooled), scores=weights)


@register_model("abmil")
def abmil(in_dim: int, num_classes: int, **kwargs) -> ABMIL:
    """Attention MIL with tanh attention."""
    return ABMIL(in_dim, num_classes, gated=False, **kwargs)


@register_model("abmil-gated")
def abmil_gated(in_dim: int, num_classes: int, **kwargs) -> ABMIL:
    """Attention MIL with gated (tanh * sigmoid) attention."""
    return ABMIL(in_dim, num_classes, gated=True, **kwargs)
