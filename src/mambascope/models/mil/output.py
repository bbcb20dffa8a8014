"""What every MIL aggregator returns, and the bag checks they share."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mambascope.errors import DataError


@dataclass
class MILOutput:
    """Slide logits and one importance score per patch, in the order the patches came in.

    `scores` are attention weights (non-negative, summing to 1 over the bag) for every model, so
    heatmaps and top-k galleries treat all models alike.
    """

    logits: torch.Tensor  # (num_classes,)
    scores: torch.Tensor  # (N,)


def check_bag(features: torch.Tensor, coords: torch.Tensor | None, in_dim: int) -> None:
    """Refuse bags a model cannot pool: wrong rank or width, no patches, coords not (N, 2)."""
    if features.ndim != 2:
        raise DataError(f"a bag must be a (patches, features) matrix, got shape {tuple(features.shape)}",
                        hint="pass one slide at a time: features of shape (N, in_dim)")
    if features.shape[0] == 0:
        raise DataError("empty bag: the slide has no patch features",
                        hint="re-run tiling/feature extraction for this slide or drop it from the CSV")
    if features.shape[1] != in_dim:
        raise DataError(f"features have dimension {features.shape[1]} but the model expects {in_dim}",
                        hint="use features from the encoder the model was trained with")
    if coords is not None and (coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != features.shape[0]):
        raise DataError(f"coords of shape {tuple(coords.shape)} do not match {features.shape[0]} patches",
                        hint="coords must be (N, 2) level-0 x, y, one row per feature row")
