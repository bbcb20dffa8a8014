"""Depthwise convolution + bias + SiLU, fused in Triton: the conv in front of every scan on a GPU.

Two convs use it: `Mamba2D`'s K×K conv with "same" zero padding, and `Mamba`'s causal 1D conv of width
K (position t sees t-K+1..t; walking from the end, t..t+K-1). A 1D sequence is a plane of one row.

Why: PyTorch runs a float32 depthwise conv with its own kernels and the SiLU as separate passes; on a
2DMamba-MIL grid (256 channels, 128 × 128 cells) that was ~0.22 ms of a 2.9 ms training step, about 10×
what reading and writing the tensors costs, and on a MambaMIL bag of 8,000 patches the four 1D convs'
backward took ~0.6 ms of a 9 ms step. Here the forward is one pass, and the backward two: the first
recomputes the conv, forms the gradient before the SiLU and sums the weight and bias gradients of its
tile; the second convolves that gradient with the mirrored kernel for the input's gradient. Only the
input is kept for the backward (PyTorch keeps the conv's output as well).

Taps: tap (i, j) of the kernel reads the input at (row + s(i - oh), col + s(j - ow)), with the origin
(oh, ow) and the sign s = -1 when the conv is `MIRRORED`. "Same": origin (K//2, K//2), s = +1; causal:
origin (0, K-1), s = +1; walking from the end: the same origin, s = -1. Each conv's input gradient is
the conv with the other sign.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambascope.ssm.triton_common import cdiv, check_device, launch


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Where a conv's taps sit (origin `oh`, `ow`; `mirrored`: s = -1) and the tile a program covers
    (`rows` × `cols`: 16 × 64 for planes, 1 × 512 for sequences)."""

    oh: int
    ow: int
    mirrored: bool
    rows: int
    cols: int

    @property
    def transposed(self) -> ConvGeometry:
        """The conv whose output is this conv's input gradient: same origin, the other sign."""
        return dataclasses.replace(self, mirrored=not self.mirrored)


@triton.jit
def _tap(rows, cols, i: tl.constexpr, j: tl.constexpr, OH: tl.constexpr, OW: tl.constexpr, MIRRORED: tl.constexpr):
    """Row and column (broadcast to the tile) that tap (i, j) reads for each output cell."""
    if MIRRORED:
        return rows[:, None] - (i - OH), cols[None, :] - (j - OW)
    return rows[:, None] + (i - OH), cols[None, :] + (j - OW)


@triton.jit
def _conv_tile(src_ptr, w_ptr, channel, rows, cols, H, W, KH: tl.constexpr, KW: tl.constexpr,
               OH: tl.constexpr, OW: tl.constexpr, MIRRORED: tl.constexpr):
    """Σ_ij w[i, j] src[row + s(i - OH), col + s(j - OW)] over one plane (zero outside it), float32."""
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            r, c = _tap(rows, cols, i, j, OH, OW, MIRRORED)
            inside = (r >= 0) & (r < H) & (c >= 0) & (c < W)
            value = tl.load(src_ptr + r * W + c, mask=inside, other=0.0).to(tl.float32)
            acc += tl.load(w_ptr + channel * KH * KW + i * KW + j) * value
    return acc


@triton.jit
def _tile(C, H, W, BR: tl.constexpr, BC: tl.constexpr):
    """This program's plane (batch × channel), channel, rows, columns, in-plane mask and plane offset."""
    plane = tl.program_id(0)
    rows = tl.program_id(1) * BR + tl.arange(0, BR)
    cols = tl.program_id(2) * BC + tl.arange(0, BC)
    inside = (rows[:, None] < H) & (cols[None, :] < W)
    return plane % C, rows, cols, inside, plane.to(tl.int64) * H * W


@triton.jit
def _forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, C, H, W, KH: tl.constexpr, KW: tl.constexpr, OH: tl.constexpr,
                    OW: tl.constexpr, MIRRORED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    channel, rows, cols, inside, base = _tile(C, H, W, BR, BC)
    pre = _conv_tile(x_ptr + base, w_ptr, channel, rows, cols, H, W, KH, KW, OH, OW, MIRRORED) + tl.load(b_ptr + channel)
    y = pre * tl.sigmoid(pre)
    tl.store(y_ptr + base + rows[:, None] * W + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _pre_grad_kernel(x_ptr, w_ptr, b_ptr, dy_ptr, g_ptr, part_ptr, C, H, W, KH: tl.constexpr, KW: tl.constexpr,
                     OH: tl.constexpr, OW: tl.constexpr, MIRRORED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """g = dy · SiLU'(conv(x) + b) for the tile, and the tile's sums Σ g · x[as tap (i, j) reads it] (the
    weight gradient's share) and Σ g (the bias's), KH·KW + 1 values per tile in `part`."""
    channel, rows, cols, inside, base = _tile(C, H, W, BR, BC)
    pre = _conv_tile(x_ptr + base, w_ptr, channel, rows, cols, H, W, KH, KW, OH, OW, MIRRORED) + tl.load(b_ptr + channel)
    offsets = base + rows[:, None] * W + cols[None, :]
    sig = tl.sigmoid(pre)
    dy = tl.load(dy_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    g = tl.where(inside, dy * sig * (1.0 + pre * (1.0 - sig)), 0.0)
    tl.store(g_ptr + offsets, g, mask=inside)
    tile = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    part = part_ptr + tile.to(tl.int64) * (KH * KW + 1)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            r, c = _tap(rows, cols, i, j, OH, OW, MIRRORED)
            shifted = (r >= 0) & (r < H) & (c >= 0) & (c < W)
            x = tl.load(x_ptr + base + r * W + c, mask=shifted, other=0.0).to(tl.float32)
            tl.store(part + i * KW + j, tl.sum(tl.sum(g * x, axis=1), axis=0))
    tl.store(part + KH * KW, tl.sum(tl.sum(g, axis=1), axis=0))


@triton.jit
def _input_grad_kernel(g_ptr, w_ptr, dx_ptr, C, H, W, KH: tl.constexpr, KW: tl.constexpr, OH: tl.constexpr,
                       OW: tl.constexpr, MIRRORED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    channel, rows, cols, inside, base = _tile(C, H, W, BR, BC)
    dx = _conv_tile(g_ptr + base, w_ptr, channel, rows, cols, H, W, KH, KW, OH, OW, MIRRORED)
    tl.store(dx_ptr + base + rows[:, None] * W + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=inside)


def _planes(x: Tensor) -> tuple[int, int, int, int]:
    """(batch, channels, H, W) of x: a sequence (batch, channels, L) is a plane of one row."""
    return (*x.shape[:2], 1, x.shape[2]) if x.dim() == 3 else tuple(x.shape)


def _grid(x: Tensor, geometry: ConvGeometry) -> tuple[int, int, int]:
    batch, channels, height, width = _planes(x)
    return batch * channels, cdiv(height, geometry.rows), cdiv(width, geometry.cols)


def _shape_args(w: Tensor, geometry: ConvGeometry) -> dict:
    return dict(KH=w.shape[-2], KW=w.shape[-1], OH=geometry.oh, OW=geometry.ow, MIRRORED=geometry.mirrored,
                BR=geometry.rows, BC=geometry.cols)


class _DepthwiseConvSiLU(torch.autograd.Function):
    """On planes (batch, channels, H, W) with a (channels, 1, KH, KW) kernel, or on sequences (batch,
    channels, L) with a (channels, 1, K) one."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, geometry: ConvGeometry) -> Tensor:
        x = x.contiguous()
        _, channels, height, width = _planes(x)
        w = weight.detach().float().reshape(channels, -1, weight.shape[-1]).contiguous()
        b = bias.detach().float().contiguous()
        y = torch.empty_like(x)
        launch(_forward_kernel, _grid(x, geometry), x, w, b, y, channels, height, width, **_shape_args(w, geometry))
        ctx.save_for_backward(x, w, b)
        ctx.geometry = geometry
        ctx.weight_shape, ctx.dtypes = weight.shape, (weight.dtype, bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        x, w, b = ctx.saved_tensors
        geometry = ctx.geometry
        batch, channels, height, width = _planes(x)
        taps = w.shape[-2] * w.shape[-1]
        grid = _grid(x, geometry)
        g = torch.empty(x.shape, device=x.device, dtype=torch.float32)
        parts = torch.empty(grid[0] * grid[1] * grid[2], taps + 1, device=x.device, dtype=torch.float32)
        launch(_pre_grad_kernel, grid, x, w, b, dy.contiguous(), g, parts, channels, height, width,
               **_shape_args(w, geometry))
        dx = torch.empty_like(x)
        launch(_input_grad_kernel, grid, g, w, dx, channels, height, width, **_shape_args(w, geometry.transposed))
        sums = parts.view(batch, channels, grid[1] * grid[2], taps + 1).sum((0, 2))
        dw = sums[:, :-1].reshape(ctx.weight_shape).to(ctx.dtypes[0])
        return dx, dw, sums[:, -1].to(ctx.dtypes[1]), None


def depthwise_conv_silu_triton(x: Tensor, weight: Tensor, bias: Tensor, reverse: bool = False) -> Tensor:
    """SiLU(depthwise conv(x) + bias), computed in float32, returned in x's dtype, differentiable in x,
    weight and bias.

    - x (B, C, H, W), weight (C, 1, K, K) with K odd: "same" zero padding.
    - x (B, C, L), weight (C, 1, K): causal, out[t] = Σ_j w[j] x[t + j - K + 1] (Mamba's conv, which
      PyTorch writes as padding K - 1 and the first L outputs); with `reverse` the conv of a walk from the
      end, out[t] = Σ_j w[j] x[t - j + K - 1] (the same as flipping x in and out).
    """
    check_device(x)
    kernel = weight.shape[-1]
    if x.dim() == 3:
        geometry = ConvGeometry(oh=0, ow=kernel - 1, mirrored=reverse, rows=1, cols=512)
    else:
        geometry = ConvGeometry(oh=kernel // 2, ow=kernel // 2, mirrored=False, rows=16, cols=64)
    return _DepthwiseConvSiLU.apply(x, weight, bias, geometry)
