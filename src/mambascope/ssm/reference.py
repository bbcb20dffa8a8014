"""The sequential oracle: the scans written as their recurrences, step by step, in float64.

Slow (a Python loop over positions) and memory-hungry (per-channel B and C), but obviously right;
every other backend is tested against it. Autograd flows through it, so it also gives reference
gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mambascope.ssm.scan_inputs import compute_dtype, effective_delta, gate_output, grouped, per_channel


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """1D selective scan over L (u: (batch, dim, L)); mamba-ssm `selective_scan_fn` semantics."""
    f64 = torch.float64
    dim = u.shape[1]
    dt = effective_delta(delta.to(f64), delta_bias, delta_softplus)
    x = u.to(f64)
    A64 = A.to(f64)
    Bc = per_channel(grouped(B, u).to(f64), dim)  # (batch, dim, N, L)
    Cc = per_channel(grouped(C, u).to(f64), dim)
    h = x.new_zeros(u.shape[0], dim, A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(dt[:, :, t, None] * A64) * h + (dt[:, :, t] * x[:, :, t])[..., None] * Bc[..., t]
        ys.append((h * Cc[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    out = gate_output(y, u, D, z, u.dtype)
    if return_last_state:
        return out, h.to(compute_dtype(u, delta, A, B, C))
    return out


def selective_scan_2d_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    mask: Tensor | None = None,
) -> Tensor:
    """2D selective scan over an (H, W) grid (u: (batch, dim, H, W)), the 2DMamba recurrence.

    Row pass `r[i,j] = Ā[i,j] r[i,j-1] + B̄[i,j] x[i,j]`, then column pass on those states
    `h[i,j] = Ā[i,j] h[i-1,j] + r[i,j]`, `y = C h`; masked cells have Δ = 0.
    """
    f64 = torch.float64
    batch, dim, H, W = u.shape
    dt = effective_delta(delta.to(f64), delta_bias, delta_softplus, mask)
    x = u.to(f64)
    A64 = A.to(f64)
    Bc = per_channel(grouped(B, u).to(f64), dim)  # (batch, dim, N, H, W)
    Cc = per_channel(grouped(C, u).to(f64), dim)
    decay = torch.exp(dt[..., None] * A64[:, None, None, :])  # (batch, dim, H, W, N)
    drive = (dt * x)[..., None] * Bc.permute(0, 1, 3, 4, 2)
    row = x.new_zeros(batch, dim, H, A.shape[1])
    rows = []
    for j in range(W):
        row = decay[:, :, :, j] * row + drive[:, :, :, j]
        rows.append(row)
    row_states = torch.stack(rows, dim=3)  # (batch, dim, H, W, N)
    col = x.new_zeros(batch, dim, W, A.shape[1])
    ys = []
    for i in range(H):
        col = decay[:, :, i] * col + row_states[:, :, i]
        ys.append((col * Cc[:, :, :, i].transpose(-1, -2)).sum(-1))
    y = torch.stack(ys, dim=2)
    return gate_output(y, u, D, z, u.dtype)
