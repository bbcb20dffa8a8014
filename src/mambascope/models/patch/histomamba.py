"""HistoMamba: a hierarchical patch classifier of spatial Mamba blocks with a reconstruction decoder.

Each stage downsamples with a strided conv (+BN, GELU) — the first one is the patch embedding, of
stride `embed_stride` (default 2), the later ones halve the resolution — and runs spatial Mamba blocks
on the token grid. A spatial Mamba block reads the tokens row by row with a Mamba mixer (long range) and then
mixes each token with its 2D neighbourhood through a sum of dilated depthwise convolutions (the
"spatially aware state fusion", restoring the 2D structure the 1D scan flattens), followed by an MLP;
both parts are residual with stochastic depth. A light transposed-conv decoder reconstructs the input
from the last feature map; its loss (weighted by `lambda_recon` in training) regularises the encoder
to keep tissue structure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from mambascope.errors import ConfigError
from mambascope.models.patch.layers import init_own_weights
from mambascope.models.registry import register_model
from mambascope.ssm import Mamba


class SpatialMambaBlock(nn.Module):
    """(B, C, H, W) -> (B, C, H, W): Mamba over the row-major token sequence + dilated depthwise mixing, MLP."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, drop_path: float = 0.0, kernel_size: int = 3,
                 dilations: Sequence[int] = (1, 3, 5), bidirectional: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mamba = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand, bidirectional=bidirectional)
        self.neighbourhood = nn.ModuleList(
            nn.Conv2d(dim, dim, kernel_size, padding=(kernel_size - 1) * d // 2, dilation=d, groups=dim)
            for d in dilations
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C), row-major
        state = self.mamba(self.norm1(tokens)).transpose(1, 2).reshape(batch, channels, height, width)
        mixed = sum(conv(state) for conv in self.neighbourhood)
        tokens = tokens + self.drop_path1(mixed.flatten(2).transpose(1, 2))
        tokens = tokens + self.drop_path2(self.mlp(self.norm2(tokens)))
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


class HistoMamba(nn.Module):
    """Images (B, 3, H, W) -> logits (B, num_classes), and on request the reconstruction (B, 3, H, W)."""

    #: the trainer adds the weighted reconstruction loss for models that set this
    supports_reconstruction = True

    def __init__(self, num_classes: int, dims: Sequence[int] = (64, 128, 256, 512),
                 depths: Sequence[int] = (1, 1, 1, 1), drop_path_rate: float = 0.1, d_state: int = 16,
                 d_conv: int = 4, expand: int = 2, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 bidirectional: bool = False, in_chans: int = 3, embed_stride: int = 2):
        super().__init__()
        if len(depths) != len(dims) or not dims:
            raise ConfigError(f"depths {list(depths)} and dims {list(dims)} must have the same length")
        if num_classes < 1:
            raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
        if embed_stride < 2:
            raise ConfigError(f"embed_stride must be at least 2, got {embed_stride}")
        self.num_classes = num_classes
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        in_dim, start = in_chans, 0
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            stride = embed_stride if i == 0 else 2  # the first conv is the patch embedding
            down = nn.Sequential(nn.Conv2d(in_dim, dim, 2 * stride - 1, stride=stride, padding=stride - 1),
                                 nn.BatchNorm2d(dim), nn.GELU())
            blocks = [SpatialMambaBlock(dim, d_state=d_state, d_conv=d_conv, expand=expand, mlp_ratio=mlp_ratio,
                                        dropout=dropout, drop_path=rates[start + j], bidirectional=bidirectional)
                      for j in range(depth)]
            self.stages.append(nn.Sequential(down, *blocks))
            in_dim, start = dim, start + depth
        self.head = nn.Sequential(nn.LayerNorm(dims[-1]), nn.Dropout(dropout), nn.Linear(dims[-1], num_classes))
        ups = []
        for out_dim in [*reversed(dims[:-1])]:
            ups += [nn.ConvTranspose2d(in_dim, out_dim, 4, stride=2, padding=1), nn.BatchNorm2d(out_dim), nn.GELU()]
            in_dim = out_dim
        ups.append(nn.ConvTranspose2d(in_dim, in_chans, 2 * embed_stride, stride=embed_stride,
                                      padding=embed_stride // 2))
        self.decoder = nn.Sequential(*ups)
        init_own_weights(self, skip=(Mamba,))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (B, dims[-1], H / (embed_stride 2^(stages-1)), likewise W)."""
        for stage in self.stages:
            x = stage(x)
        return x

    def reconstruct(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Decode a feature map back to an image of `size` (resized when the sizes do not divide evenly)."""
        image = self.decoder(features)
        if image.shape[-2:] != size:
            image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        return image

    def forward(self, x: torch.Tensor, return_reconstruction: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.encode(x)
        logits = self.head(features.mean(dim=(2, 3)))
        if return_reconstruction:
            return logits, self.reconstruct(features, tuple(x.shape[-2:]))
        return logits


VARIANTS = {
    "small": {"dims": (32, 64, 128, 256), "depths": (1, 1, 1, 1)},
    "base": {"dims": (64, 128, 256, 512), "depths": (1, 1, 1, 1)},
    "deep": {"dims": (64, 128, 256, 512), "depths": (2, 2, 4, 2)},
}


def _factory(variant: str):
    def build(num_classes: int, **kwargs) -> HistoMamba:
        return HistoMamba(num_classes=num_classes, **{**VARIANTS[variant], **kwargs})

    build.__name__ = f"histomamba_{variant}"
    build.__doc__ = f"HistoMamba-{variant}: widths {VARIANTS[variant]['dims']}, depths " \
                    f"{VARIANTS[variant]['depths']} (override with dims=/depths=)."
    return build


for _variant in VARIANTS:
    register_model(f"histomamba-{_variant}")(_factory(_variant))
