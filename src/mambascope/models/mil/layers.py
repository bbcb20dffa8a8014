"""Building blocks shared by the MIL aggregators: feature projection and attention pooling."""

from __future__ import annotations

import torch
from torch import nn


def projection(in_dim: int, dim: int, dropout: float) -> nn.Sequential:
    """Linear + ReLU + dropout: maps encoder features to the aggregator's width."""
    return nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(dropout))


class AttentionPooling(nn.Module):
    """Attention-based pooling (Ilse et al. 2018), plain (tanh) or gated (tanh * sigmoid).

    Returns the weighted mean of the instances and the attention weights, which are a softmax over
    the real instances only (`mask` False entries get weight 0).
    """

    def __init__(self, dim: int, attn_dim: int, gated: bool = False, dropout: float = 0.0):
        super().__init__()
        self.value = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.gate = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        self.weight = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.value(h)
        if self.gate is not None:
            a = a * self.gate(h)
        logits = self.weight(a).squeeze(-1).float()
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        pooled = weights.to(h.dtype) @ h
        return pooled, weights
