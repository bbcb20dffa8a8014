"""Microscopic-Mamba (Zou et al., 2024): a ~4M-parameter CNN + VSSM hybrid for microscopy images.

Conv stem (two 3x3 stride-2 conv+BN, GELU between), four stages joined by patch merging. Each block
splits its channels in half: the *conv branch* (depthwise -> grouped -> pointwise, BN+ReLU each) keeps
local texture; the *VSSM branch* (LayerNorm, channels in four chunks through one shared SS2D with 4-way
cross-scan) sees the whole image. The SS2D's output projection is the Partially Selected FFN (PSFFN):
a 1x1 conv + SiLU, then a depthwise 3x3 on a quarter of the channels only, then a channel shuffle.
Modulation Interaction Feature Aggregation (MIFA) lets each branch gate the other through one shared
depthwise 3x3 and a sigmoid, shuffles the channels and re-weights them with channel attention. The
block adds the result to its input (with DropPath). Global average pooling and a linear head classify.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from mambascope.errors import ConfigError
from mambascope.models.patch.layers import PatchMerging2D, conv_bn, init_own_weights, pair_shuffle
from mambascope.models.registry import register_model
from mambascope.ssm import SS2D


class PartiallySelectedFFN(nn.Module):
    """PSFFN: SS2D output projection (B, H, W, d_inner) -> (B, H, W, d_model).

    LayerNorm of the merged scans, 1x1 conv + SiLU to d_model, depthwise 3x3 + SiLU on the first
    `selected_ratio` of the channels (the rest pass unchanged), then a pair-wise channel shuffle so the
    spatially mixed channels spread through the next layers.
    """

    def __init__(self, d_inner: int, d_model: int, selected_ratio: float = 0.25):
        super().__init__()
        self.norm = nn.LayerNorm(d_inner)
        self.proj = nn.Conv2d(d_inner, d_model, 1)
        self.selected = max(1, int(d_model * selected_ratio))
        self.local = nn.Conv2d(self.selected, self.selected, 3, padding=1, groups=self.selected)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.proj(self.norm(x).permute(0, 3, 1, 2)))
        picked, rest = x.split([self.selected, x.shape[1] - self.selected], dim=1)
        x = torch.cat([F.silu(self.local(picked)), rest], dim=1)
        return pair_shuffle(x).permute(0, 2, 3, 1)


class ChunkedVSSM(nn.Module):
    """VSSM branch (the parallel vision Mamba layer): LayerNorm, four channel chunks through one shared
    SS2D (plus a learned skip), LayerNorm, linear projection.

    Sharing one SS2D over the chunks is what keeps the model small; the chunks run as one batch.
    """

    def __init__(self, dim: int, d_state: int = 16, expand: float = 2.0, d_conv: int = 3, chunks: int = 4):
        super().__init__()
        if dim % chunks:
            raise ConfigError(f"VSSM width {dim} is not divisible into {chunks} chunks")
        self.chunks = chunks
        d_model = dim // chunks
        d_inner = int(expand * d_model)
        self.norm_in = nn.LayerNorm(dim)
        self.ss2d = SS2D(d_model, d_state=d_state, expand=expand, d_conv=d_conv,
                         out_proj=PartiallySelectedFFN(d_inner, d_model))
        if self.ss2d.d_inner != d_inner:
            raise ConfigError(f"SS2D inner width {self.ss2d.d_inner} differs from the PSFFN's {d_inner}")
        self.skip_scale = nn.Parameter(torch.ones(1))
        self.norm_out = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        x = self.norm_in(x)
        parts = torch.cat(x.chunk(self.chunks, dim=-1), dim=0)  # (chunks * B, H, W, dim / chunks)
        y = self.ss2d(parts) + self.skip_scale * parts
        return self.proj(self.norm_out(torch.cat(y.split(batch, dim=0), dim=-1)))


def conv_branch(channels: int) -> nn.Sequential:
    """Local branch: BN, depthwise 3x3, grouped 3x3 (x2 channels), pointwise 1x1 back; BN+ReLU after each."""
    return nn.Sequential(
        nn.BatchNorm2d(channels),
        conv_bn(channels, channels, 3, groups=channels), nn.ReLU(inplace=True),
        conv_bn(channels, 2 * channels, 3, groups=channels), nn.ReLU(inplace=True),
        conv_bn(2 * channels, channels, 1), nn.ReLU(inplace=True),
    )


class ModulationInteraction(nn.Module):
    """MIFA: cross-gate the conv and VSSM branches, shuffle channels, channel attention.

    One depthwise 3x3 is shared by both gates: sigmoid(ReLU(dw(conv))) modulates the VSSM features and
    sigmoid(GELU(dw(vssm))) the conv features. The channel attention is ECA with a kernel of one: a
    learned per-channel scale of the pooled response through a sigmoid.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.gate = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.attention = nn.Conv2d(2 * channels, 2 * channels, 1, groups=2 * channels, bias=False)

    def forward(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        local_gate = torch.sigmoid(F.relu(self.gate(local)))
        global_gate = torch.sigmoid(F.gelu(self.gate(global_)))
        x = torch.cat([local_gate * global_, global_gate * local], dim=1)
        x = pair_shuffle(x)
        return x * torch.sigmoid(self.attention(x.mean(dim=(2, 3), keepdim=True)))


class MicroscopicBlock(nn.Module):
    """Split channels into a conv half and a VSSM half, fuse them with MIFA, add to the input."""

    def __init__(self, dim: int, d_state: int = 16, drop_path: float = 0.0, expand: float = 2.0):
        super().__init__()
        half = dim // 2
        self.conv = conv_branch(half)
        self.vssm = ChunkedVSSM(half, d_state=d_state, expand=expand)
        self.fuse = ModulationInteraction(half)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x.chunk(2, dim=-1)
        local = self.conv(left.permute(0, 3, 1, 2))
        global_ = pair_shuffle(self.vssm(right).permute(0, 3, 1, 2))
        fused = self.fuse(local, global_).permute(0, 2, 3, 1)
        return x + self.drop_path(fused)


class MicroscopicMamba(nn.Module):
    """Microscopic-Mamba classifier: images (B, 3, H, W) -> logits (B, num_classes)."""

    def __init__(self, num_classes: int = 1000, depths: Sequence[int] = (2, 2, 4, 2),
                 dims: Sequence[int] = (96, 192, 384, 768), d_state: int = 16, drop_path_rate: float = 0.1,
                 drop_rate: float = 0.0, in_chans: int = 3, ssm_expand: float = 2.0):
        super().__init__()
        if len(depths) != len(dims) or not dims:
            raise ConfigError(f"depths {list(depths)} and dims {list(dims)} must have the same length")
        bad = [d for d in dims if d % 16]
        if bad:
            raise ConfigError(f"Microscopic-Mamba widths must be multiples of 16, got {bad}",
                              hint="the VSSM half of each block is split into four SS2D chunks of even width")
        if num_classes < 1:
            raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.stem = nn.Sequential(conv_bn(in_chans, dims[0] // 2, 3, stride=2), nn.GELU(),
                                  conv_bn(dims[0] // 2, dims[0], 3, stride=2))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        start = 0
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            self.stages.append(nn.Sequential(*[
                MicroscopicBlock(dim, d_state=d_state, drop_path=rates[start + j], expand=ssm_expand)
                for j in range(depth)
            ]))
            start += depth
            if i < len(dims) - 1:
                self.merges.append(PatchMerging2D(dim, dims[i + 1]))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes)
        self.num_features = dims[-1]
        init_own_weights(self, skip=(SS2D,))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, dims[-1])."""
        x = self.stem(x).permute(0, 2, 3, 1)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.merges):
                x = self.merges[i](x)
        return x.mean(dim=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x)))


VARIANTS = {
    "tiny": {"depths": (2, 2, 4, 2), "dims": (96, 192, 384, 768)},
    "small": {"depths": (2, 2, 8, 2), "dims": (96, 192, 384, 768)},
    "base": {"depths": (2, 2, 12, 2), "dims": (128, 256, 512, 1024)},
}


def _factory(variant: str):
    def build(num_classes: int = 1000, **kwargs) -> MicroscopicMamba:
        return MicroscopicMamba(num_classes=num_classes, **{**VARIANTS[variant], **kwargs})

    build.__name__ = f"microscopic_mamba_{variant}"
    build.__doc__ = f"Microscopic-Mamba-{variant.capitalize()}: depths {VARIANTS[variant]['depths']}, " \
                    f"widths {VARIANTS[variant]['dims']} (override with depths=/dims=)."
    return build


for _variant in VARIANTS:
    register_model(f"microscopic-mamba-{_variant}")(_factory(_variant))
