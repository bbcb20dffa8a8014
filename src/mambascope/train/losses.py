"""Slide-classification losses: class-weighted cross-entropy or focal loss (MONAI)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from mambascope.errors import ConfigError
from mambascope.train.mil_options import LOSSES


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> list[float]:
    """n / (C * n_c) per class, so each class contributes equally; classes absent from `labels` get 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return weights.tolist()


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy where each bag counts with its class weight.

    torch's weighted `CrossEntropyLoss` divides by the batch's summed weights, which for one bag per
    step cancels the weight; here the mean of weight × loss keeps it, also across accumulated steps.
    """

    def __init__(self, weight: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float(), target, weight=self.weight, reduction="none").mean()


class FocalLoss(nn.Module):
    """Softmax focal loss on (B, C) logits and (B,) integer targets, via MONAI's implementation."""

    def __init__(self, gamma: float, weight: torch.Tensor | None):
        super().__init__()
        from monai.losses import FocalLoss as MonaiFocalLoss

        self.loss = MonaiFocalLoss(to_onehot_y=True, use_softmax=True, gamma=gamma, weight=weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits.float(), target.view(-1, 1))


def make_loss(kind: str, class_weights: Sequence[float] | None = None, focal_gamma: float = 2.0) -> nn.Module:
    """`ce` (optionally class-weighted) or `focal` (same weights as its per-class alpha)."""
    weight = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
    if kind == "ce":
        return WeightedCrossEntropy(weight)
    if kind == "focal":
        return FocalLoss(focal_gamma, weight)
    raise ConfigError(f"unknown loss {kind!r}", hint=f"choose one of: {', '.join(LOSSES)}")
