"""SegMamba's encoder: gated spatial convolution plus tri-orientated Mamba over the 3D token grid.

Each stage downsamples (a 7³ stride-2 stem first, then norm + 2³ stride-2 convolutions), mixes locally with
a gated spatial convolution (GSC), and globally with tri-orientated Mamba (ToM) layers that scan the
flattened voxel tokens in three orders: forward, reverse, and inter-slice (the scan hops across slices
before moving within a slice). The stage's skip feature is a normalised channel MLP of its output.
"""

from __future__ import annotations

import torch
from torch import nn

from mambascope.ssm import Mamba


def _conv(channels: int, kernel_size: int) -> nn.Module:
    """conv -> instance norm -> ReLU, same size."""
    from monai.networks.blocks import Convolution  # lazy: importing MONAI's networks takes seconds

    return Convolution(3, channels, channels, kernel_size=kernel_size, act="RELU", norm="INSTANCE")


class GatedSpatialConv(nn.Module):
    """GSC: a two-layer 3³ conv branch gated (multiplied) by a 1³ conv branch, fused by a 1³ conv, residual.

    The gate lets each voxel choose how much local spatial context passes into the Mamba layers.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.spatial = nn.Sequential(_conv(channels, 3), _conv(channels, 3))
        self.gate = _conv(channels, 1)
        self.fuse = _conv(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fuse(self.spatial(x) * self.gate(x))


class TriOrientedMamba(nn.Module):
    """ToM layer: pre-norm; one Mamba mixer per scan order, outputs put back in voxel order and averaged.

    The orders are those of `ssm.orders.tri_orientation_orders`. The reverse walk is a `reverse=True`
    mixer (the scan walks from the end in its kernels: no reversed copies); the inter-slice walk, which
    visits every slice at one (h, w) before moving on, is a transposed copy of the tokens each way.
    Works for any (D, H, W).
    """

    def __init__(self, channels: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 backend: str = "auto"):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.mixers = nn.ModuleList(
            Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend, reverse=order == 1)
            for order in range(3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, L, C), L in row-major (D, H, W) order
        normed = self.norm(tokens)
        forward, reverse, inter_slice = self.mixers
        across = normed.view(b, d, h * w, c).transpose(1, 2).reshape(b, d * h * w, c)
        back = inter_slice(across).view(b, h * w, d, c).transpose(1, 2).reshape(b, d * h * w, c)
        out = tokens + (forward(normed) + reverse(normed) + back) / 3
        return out.transpose(1, 2).reshape(b, c, d, h, w)


class ChannelMlp(nn.Module):
    """1³ conv -> GELU -> 1³ conv, widening by `ratio` in between."""

    def __init__(self, channels: int, ratio: int = 2):
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(channels, ratio * channels, 1), nn.GELU(),
                                 nn.Conv3d(ratio * channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EncoderStage(nn.Module):
    """Downsample x2, GSC, `depth` ToM layers; returns (features for the next stage, skip features)."""

    def __init__(self, in_channels: int, out_channels: int, depth: int, stem: bool, d_state: int = 16,
                 d_conv: int = 4, expand: int = 2, backend: str = "auto"):
        super().__init__()
        if stem:
            self.down: nn.Module = nn.Conv3d(in_channels, out_channels, kernel_size=7, stride=2, padding=3)
        else:
            self.down = nn.Sequential(nn.InstanceNorm3d(in_channels),
                                      nn.Conv3d(in_channels, out_channels, kernel_size=2, stride=2))
        self.gsc = GatedSpatialConv(out_channels)
        self.mamba = nn.Sequential(*(TriOrientedMamba(out_channels, d_state, d_conv, expand, backend)
                                     for _ in range(depth)))
        self.skip = nn.Sequential(nn.InstanceNorm3d(out_channels), ChannelMlp(out_channels))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.mamba(self.gsc(self.down(x)))
        return x, self.skip(x)
