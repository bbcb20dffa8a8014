"""Image transforms of the patch classifiers, described by a small spec a checkpoint can carry.

Training augments with one of two recipes: `histopathology` (resize, flips, 90-degree rotations,
mild colour jitter: tissue has no orientation and stains vary) or `microscopy` (the Microscopic-Mamba
paper's random resized crop). Evaluation and prediction only resize and normalise,
with the mean and std the model was trained with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mambascope.errors import ConfigError

RECIPES = ("histopathology", "microscopy")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TransformSpec:
    """Input size, normalisation and training recipe; saved in checkpoints as a plain dict."""

    img_size: int
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    recipe: str = "histopathology"

    def __post_init__(self) -> None:
        if self.img_size < 8:
            raise ConfigError(f"image size must be at least 8 pixels, got {self.img_size}")
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown augmentation recipe {self.recipe!r}", hint=f"use one of {RECIPES}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"mean {self.mean} and std {self.std} need three values each, std > 0",
                              hint="e.g. run `mambascope stats ROOT`")
        self.mean = [float(v) for v in self.mean]
        self.std = [float(v) for v in self.std]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RandomRot90(nn.Module):
    """Rotate by a random multiple of 90 degrees (exact, no interpolation)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        turns = int(torch.randint(0, 4, ()).item())
        return torch.rot90(image, turns, dims=(-2, -1)) if turns else image


class ArrayTransform:
    """Apply a torchvision pipeline to an (H, W, 3) uint8 array (a class, so worker processes can pickle it)."""

    def __init__(self, pipeline: Callable[[torch.Tensor], torch.Tensor]):
        self.pipeline = pipeline

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.pipeline(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous())


def build_transform(spec: TransformSpec, train: bool) -> ArrayTransform:
    """(H, W, 3) uint8 array -> normalised float (3, img_size, img_size) tensor."""
    from torchvision.transforms import v2

    size = (spec.img_size, spec.img_size)
    steps: Sequence[nn.Module]
    if not train:
        steps = [v2.Resize(size, antialias=True)]
    elif spec.recipe == "microscopy":
        steps = [v2.RandomResizedCrop(size, antialias=True)]
    else:
        steps = [v2.Resize(size, antialias=True), v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
                 RandomRot90(), v2.ColorJitter(brightness=0.08, contrast=0.08, saturation=0.08, hue=0.04)]
    return ArrayTransform(v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True),
                                      v2.Normalize(spec.mean, spec.std)]))
