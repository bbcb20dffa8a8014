"""SegMamba (Xing et al., MICCAI 2024): Mamba encoder, UNETR-style convolutional decoder, 3D volumes.

Input (B, in_channels, D, H, W) of any size; output logits (B, out_channels, D, H, W), one independent
sigmoid channel per region (TC, WT, ET for BraTS). The encoder works at 1/2, 1/4, 1/8 and 1/16 of the
input size, so inputs are zero-padded up to a multiple of 16 and the output is cropped back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mambascope.models.registry import register_model
from mambascope.models.seg.encoder import EncoderStage

DOWNSAMPLING = 16


def _basic(in_channels: int, out_channels: int) -> nn.Module:
    from monai.networks.blocks import UnetrBasicBlock  # lazy: importing MONAI's networks takes seconds

    return UnetrBasicBlock(3, in_channels, out_channels, kernel_size=3, stride=1, norm_name="instance",
                           res_block=True)


def _up(in_channels: int, out_channels: int) -> nn.Module:
    from monai.networks.blocks import UnetrUpBlock

    return UnetrUpBlock(3, in_channels, out_channels, kernel_size=3, upsample_kernel_size=2,
                        norm_name="instance", res_block=True)


@register_model("segmamba")
class SegMamba(nn.Module):
    """SegMamba for 3D segmentation.

    Args:
        in_channels: input modalities (4 for BraTS).
        out_channels: output regions (3 for BraTS: TC, WT, ET).
        base_channels: width of the first stage; the four stages use 1, 2, 4, 8 times it.
        depths: tri-orientated Mamba layers per stage.
        hidden_channels: bottleneck width (default 16 * base_channels, 768 for the paper's 48).
        d_state, d_conv, expand: Mamba mixer settings.
        gradient_checkpointing: recompute each encoder stage and decoder block in the backward pass,
            trading compute for activation memory at 128³.
        backend: selective-scan backend for the Mamba mixers ("auto", "torch", "triton", ...).
    """

    def __init__(self, in_channels: int = 4, out_channels: int = 3, base_channels: int = 48,
                 depths: Sequence[int] = (2, 2, 2, 2), hidden_channels: int | None = None, d_state: int = 16,
                 d_conv: int = 4, expand: int = 2, gradient_checkpointing: bool = False,
                 backend: str = "auto"):
        from monai.networks.blocks import UnetOutBlock

        super().__init__()
        if len(depths) != 4:
            raise ValueError(f"SegMamba has four encoder stages; got depths {tuple(depths)}")
        dims = [base_channels * 2**i for i in range(4)]
        hidden = hidden_channels or 16 * base_channels
        self.gradient_checkpointing = gradient_checkpointing
        self.stages = nn.ModuleList(
            EncoderStage(in_channels if i == 0 else dims[i - 1], dims[i], depths[i], stem=i == 0,
                         d_state=d_state, d_conv=d_conv, expand=expand, backend=backend)
            for i in range(4)
        )
        # UNETR-style decoder: conv blocks on the raw input and on every stage's skip features.
        self.skip_blocks = nn.ModuleList([_basic(in_channels, dims[0]), _basic(dims[0], dims[1]),
                                          _basic(dims[1], dims[2]), _basic(dims[2], dims[3]),
                                          _basic(dims[3], hidden)])
        self.up_blocks = nn.ModuleList([_up(hidden, dims[3]), _up(dims[3], dims[2]), _up(dims[2], dims[1]),
                                        _up(dims[1], dims[0])])
        self.head = nn.Sequential(_basic(dims[0], dims[0]), UnetOutBlock(3, dims[0], out_channels))

    def _run(self, module: nn.Module, *args: torch.Tensor):  # returns what `module` returns
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        pad = [(-s) % DOWNSAMPLING for s in size]
        if any(pad):
            x = F.pad(x, [p for s in reversed(pad) for p in (0, s)])
        skips = [self._run(self.skip_blocks[0], x)]
        features = x
        for i, stage in enumerate(self.stages):
            features, skip = self._run(stage, features)
            skips.append(self._run(self.skip_blocks[i + 1], skip))
        out = skips.pop()
        for block in self.up_blocks:
            out = self._run(block, out, skips.pop())
        logits = self._run(self.head, out)
        return logits[:, :, : size[0], : size[1], : size[2]]
