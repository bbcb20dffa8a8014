"""Scan orders: the ways a block walks a sequence, an image or a volume, as index maps.

A scan is causal, so each token sees only what comes before it in the walk; blocks run several walks
and combine them so every token sees every other. Each walk is a permutation of the flattened
positions plus its inverse, which puts outputs back in place.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class ScanOrder(NamedTuple):
    """A walk over `n` flattened positions: `perm[k]` is the position visited k-th; `inverse` undoes it."""

    perm: Tensor
    inverse: Tensor

    @classmethod
    def from_perm(cls, perm: Tensor) -> ScanOrder:
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return cls(perm, inverse)

    def apply(self, x: Tensor, dim: int = -1) -> Tensor:
        """Reorder x's positions along `dim` into walk order."""
        return x.index_select(dim, self.perm.to(x.device))

    def restore(self, y: Tensor, dim: int = -1) -> Tensor:
        """Put walk-ordered outputs back at their positions."""
        return y.index_select(dim, self.inverse.to(y.device))


def reverse_order(n: int) -> ScanOrder:
    """The walk from the last position to the first (its own inverse)."""
    perm = torch.arange(n - 1, -1, -1)
    return ScanOrder(perm, perm)


def bidirectional_orders(n: int) -> list[ScanOrder]:
    """Forward and reverse walks, as used by bidirectional Mamba (Vim, MambaMIL)."""
    identity = torch.arange(n)
    return [ScanOrder(identity, identity), reverse_order(n)]


def tri_orientation_orders(D: int, H: int, W: int) -> list[tuple[Tensor, Tensor]]:
    """SegMamba's three walks over a (D, H, W) volume flattened in C order, as (perm, inverse).

    forward: slice by slice, row-major; reverse: the same backwards; inter-slice: through the depth
    first, visiting every slice at one (h, w) position before moving to the next position.
    """
    n = D * H * W
    forward = torch.arange(n)
    inter_slice = forward.view(D, H * W).t().reshape(-1)
    return [ScanOrder(forward, forward), reverse_order(n), ScanOrder.from_perm(inter_slice)]


def cross_scan(x: Tensor) -> Tensor:
    """VMamba's four walks over an image: (B, C, H, W) -> (B, 4, C, H*W).

    Row-major, column-major, and both reversed, so together they reach each pixel from every side.
    """
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    both = torch.stack([rows, cols], dim=1)
    return torch.cat([both, both.flip(-1)], dim=1)


def cross_merge(y: Tensor, H: int, W: int) -> Tensor:
    """Sum the four walks' outputs back in row-major order: (B, 4, C, H*W) -> (B, C, H*W).

    The exact adjoint of `cross_scan`: `cross_merge(cross_scan(x))` is 4x.
    """
    both = y[:, :2] + y[:, 2:].flip(-1)
    B, _, C, _ = y.shape
    cols = both[:, 1].view(B, C, W, H).transpose(2, 3).reshape(B, C, H * W)
    return both[:, 0] + cols
