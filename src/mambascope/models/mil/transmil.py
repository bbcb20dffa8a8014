"""TransMIL (Shao et al. 2021): two Nyström-attention layers around a pyramid position encoding (PPEG).

The bag is padded to a square number of tokens (by repeating its first patches), given a class token,
mixed by Nyström self-attention (linear in N, so 10k+ patch bags fit), and classified from the class
token. Per-patch scores are the class token's attention rollout (Abnar & Zuidema 2020): its exact
softmax attention in the last layer (mean over heads) plus its residual path, carried back through the
first layer's Nyström attention plus residual; the weight on padding copies is folded back onto the
patches they copy, and the class token's own share is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mambascope.models.mil.layers import projection
from mambascope.models.mil.output import MILOutput, check_bag
from mambascope.models.registry import register_model


def _iterative_pinv(x: torch.Tensor, iterations: int) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of softmax matrices by the Newton-Schulz style iteration of Nyströmformer."""
    abs_x = x.abs()
    scale = abs_x.sum(-1).amax(-1) * abs_x.sum(-2).amax(-1)
    z = x.transpose(-1, -2) / scale[..., None, None]
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


@dataclass
class NystromFactors:
    """One attention call's pieces: front padding, scaled queries, keys, values (b, heads, n + pad, d) and
    the factors of attention ≈ kernel1 @ kernel2 (the pseudo-inverse) @ kernel3."""

    pad: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kernel1: torch.Tensor
    kernel2: torch.Tensor
    kernel3: torch.Tensor


class NystromAttention(nn.Module):
    """Multi-head self-attention approximated with `landmarks` segment-mean landmarks (Xiong et al. 2021)."""

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iterations: int = 6, conv_kernel: int = 33,
                 dropout: float = 0.1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads, self.landmarks, self.pinv_iterations = heads, landmarks, pinv_iterations
        self.scale = (dim // heads) ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.value_conv = nn.Conv2d(heads, heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=heads,
                                    bias=False)

    def factors(self, x: torch.Tensor) -> NystromFactors:
        """Project x (b, n, dim) and build the Nyström factors of its attention."""
        b, n, _ = x.shape
        m = self.landmarks
        pad = (-n) % m
        if pad:  # zero tokens in front, so the length splits into m equal segments
            x = F.pad(x, (0, 0, pad, 0))
        q, k, v = (t.reshape(b, n + pad, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        q = q * self.scale
        segment = (n + pad) // m
        q_land = q.reshape(b, self.heads, m, segment, -1).mean(3)
        k_land = k.reshape(b, self.heads, m, segment, -1).mean(3)
        kernel2 = torch.softmax(q_land @ k_land.transpose(-1, -2), dim=-1)
        return NystromFactors(
            pad=pad, q=q, k=k, v=v,
            kernel1=torch.softmax(q @ k_land.transpose(-1, -2), dim=-1),
            kernel2=_iterative_pinv(kernel2.float(), self.pinv_iterations).to(q.dtype),
            kernel3=torch.softmax(q_land @ k.transpose(-1, -2), dim=-1),
        )

    def attend(self, f: NystromFactors) -> torch.Tensor:
        """The attention output (b, n, dim) from the factors (padding removed)."""
        out = f.kernel1 @ (f.kernel2 @ (f.kernel3 @ f.v)) + self.value_conv(f.v)
        out = out.transpose(1, 2).reshape(f.v.shape[0], f.v.shape[2], -1)
        return self.to_out(out[:, f.pad:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(self.factors(x))

    @staticmethod
    def query_attention(f: NystromFactors, position: int = 0) -> torch.Tensor:
        """Exact softmax attention of one token (the class token) over the real tokens, mean over heads: (b, n)."""
        q = f.q[:, :, f.pad + position : f.pad + position + 1]
        return torch.softmax((q @ f.k[:, :, f.pad:].transpose(-1, -2)).float(), dim=-1).mean(1).squeeze(1)

    @classmethod
    def roll_back(cls, f: NystromFactors, weights: torch.Tensor) -> torch.Tensor:
        """Attention rollout through this layer: `weights` (b, n) over its outputs -> over its inputs.

        Mixes the identity (residual path) and the attention matrix half and half, so a token that
        gathered a patch's content passes its weight back to that patch: exact softmax for token 0
        (the class token), the Nyström approximation (negatives clipped) for the others. O(n · m).
        """
        rest = weights.clone()
        rest[:, 0] = 0  # token 0 (the class token) goes through its exact attention row instead
        w = F.pad(rest, (f.pad, 0)).unsqueeze(1).unsqueeze(2).to(f.kernel1.dtype)  # (b, 1, 1, n + pad)
        through = (((w @ f.kernel1) @ f.kernel2) @ f.kernel3).squeeze(2).float().clamp(min=0).mean(1)[:, f.pad:]
        through = through * (rest.sum(-1, keepdim=True) / through.sum(-1, keepdim=True).clamp(min=1e-12))
        through = through + weights[:, :1] * cls.query_attention(f)
        return 0.5 * weights + 0.5 * through


class TransLayer(nn.Module):
    """Pre-norm Nyström attention with a residual connection; also returns the attention factors."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=heads, landmarks=max(1, dim // 2), dropout=dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, NystromFactors]:
        factors = self.attn.factors(self.norm(x))
        return x + self.attn.attend(factors), factors


class PPEG(nn.Module):
    """Pyramid position encoding generator: 7×7, 5×5 and 3×3 depthwise convolutions over the token square."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls_token, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], -1, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(nn.Module):
    """Projection, class token, TransLayer, PPEG, TransLayer, LayerNorm, linear head on the class token."""

    def __init__(self, in_dim: int, num_classes: int, dim: int = 512, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.in_dim = in_dim
        self.embed = projection(in_dim, dim, dropout)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.layer1 = TransLayer(dim, heads, dropout)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, heads, dropout)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        check_bag(features, coords, self.in_dim)
        n = features.shape[0]
        h = self.embed(features).unsqueeze(0)
        side = math.ceil(math.sqrt(n))
        source = torch.arange(side * side, device=features.device) % n  # padding repeats the first patches
        h = h[:, source]
        h = torch.cat([self.cls_token.to(h.dtype), h], dim=1)
        h, factors1 = self.layer1(h)
        h, factors2 = self.layer2(self.ppeg(h, side))
        h = self.norm(h)
        attention = self.layer2.attn.query_attention(factors2)
        attention = 0.5 * attention + 0.5 * F.one_hot(torch.tensor([0], device=h.device), h.shape[1])  # residual
        attention = self.layer1.attn.roll_back(factors1, attention)[0, 1:]
        scores = torch.zeros(n, device=features.device, dtype=attention.dtype).index_add_(0, source, attention)
        return MILOutput(logits=self.head(h[0, 0]), scores=scores / scores.sum())


@register_model("transmil")
def transmil(in_dim: int, num_classes: int, **kwargs) -> TransMIL:
    """TransMIL with Nyström attention (landmarks = dim / 2) and PPEG."""
    return TransMIL(in_dim, num_classes, **kwargs)
