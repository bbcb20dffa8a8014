"""Convolutional pieces shared by the patch classifiers: conv+BN, channel shuffle, patch merging, init."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
            groups: int = 1) -> nn.Sequential:
    """Conv (no bias, BN has one) followed by BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
    )


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle of a (B, C, H, W) tensor: C = groups x k becomes k x groups."""
    batch, channels, height, width = x.shape
    if groups <= 1 or channels % groups:
        raise ValueError(f"cannot shuffle {channels} channels in {groups} groups")
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2)
    return x.reshape(batch, channels, height, width)


def pair_shuffle(x: torch.Tensor) -> torch.Tensor:
    """Channel shuffle with groups of two channels (C/2 groups), as Microscopic-Mamba uses it."""
    channels = x.shape[1]
    return channel_shuffle(x, channels // 2) if channels >= 4 else x


class PatchMerging2D(nn.Module):
    """Halve H and W, double channels: concatenate each 2x2 neighbourhood, LayerNorm, linear (Swin/VMamba).

    Works channels-last, (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C); odd sizes are zero-padded.
    """

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1:3]
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


def init_weights(module: nn.Module) -> None:
    """Truncated-normal linears, Kaiming convs, unit norms (the usual ViT/VMamba initialisation).

    Applied before the state-space blocks set their own special parameters (A, D, dt bias), which are
    plain `nn.Parameter`s and so untouched here.
    """
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_own_weights(module: nn.Module, skip: tuple[type[nn.Module], ...]) -> None:
    """`init_weights` on every submodule except inside `skip` types (state-space mixers own their init)."""
    if isinstance(module, skip):
        return
    init_weights(module)
    for child in module.children():
        init_own_weights(child, skip)
