"""Argument checks and the element-wise pieces every scan backend shares.

The selective scan is `h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t`, `y_t = C_t · h_t`, `out = (y + D u) silu(z)`.
Only the recurrence differs between backends; the steps before it (Δ bias, softplus, mask) and after
it (skip, gate, dtype) live here once so that every backend computes the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def check_scan_args(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    mask: Tensor | None = None,
    spatial_dims: int = 1,
) -> None:
    """Raise ValueError naming the first argument whose shape does not fit the scan.

    `spatial_dims` is 1 for the sequence scan (u: (batch, dim, L)) and 2 for the grid scan
    (u: (batch, dim, H, W)). B and C are (batch, N, *spatial) or grouped (batch, G, N, *spatial).
    """
    if u.dim() != 2 + spatial_dims:
        names = "(batch, dim, L)" if spatial_dims == 1 else "(batch, dim, H, W)"
        raise ValueError(f"u must be {names}, got shape {tuple(u.shape)}")
    batch, dim, *spatial = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, N), got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported; use a real A (S4D-real initialisation)")
    n_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == u.dim():
            expected = (batch, n_state, *spatial)
        elif t.dim() == u.dim() + 1:
            groups = t.shape[1]
            if groups < 1 or dim % groups:
                raise ValueError(f"{name} has {groups} groups, which does not divide dim={dim}")
            expected = (batch, groups, n_state, *spatial)
        else:
            expected = None
        if expected is None or tuple(t.shape) != expected:
            raise ValueError(
                f"{name} must be (batch, N, *spatial) or (batch, G, N, *spatial) matching u {tuple(u.shape)} "
                f"and A {tuple(A.shape)}, got {tuple(t.shape)}"
            )
    if B.shape != C.shape:
        raise ValueError(f"B and C must have the same shape (the same groups), got {tuple(B.shape)} and {tuple(C.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{name} must be (dim={dim},), got {tuple(t.shape)}")
    if mask is not None and (tuple(mask.shape) != (batch, *spatial) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be bool (batch, H, W) = {(batch, *spatial)}, got {mask.dtype} {tuple(mask.shape)}")
    if min(spatial) < 1:
        raise ValueError(f"the scan needs at least one position, got u of shape {tuple(u.shape)}")


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any input is float64, else float32: half-precision inputs accumulate in float32."""
    present = [t for t in tensors if t is not None]
    return torch.float64 if any(t.dtype == torch.float64 for t in present) else torch.float32


def effective_delta(
    delta: Tensor,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    mask: Tensor | None = None,
) -> Tensor:
    """Δ as the recurrence uses it: bias, then softplus, then Δ = 0 on masked-out cells."""
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype).view(-1, *([1] * (delta.dim() - 2)))
    if delta_softplus:
        delta = F.softplus(delta)
    if mask is not None:
        delta = delta * mask.unsqueeze(1).to(delta.dtype)
    return delta


def grouped(BC: Tensor, u: Tensor) -> Tensor:
    """B or C as (batch, G, N, *spatial); the ungrouped form is the single-group case."""
    return BC.unsqueeze(1) if BC.dim() == u.dim() else BC


def per_channel(BC: Tensor, dim: int) -> Tensor:
    """Grouped B or C (batch, G, N, *spatial) -> (batch, dim, N, *spatial): channel c uses group c // (dim/G).

    Materialises the per-channel copy, which only the reference oracle can afford.
    """
    return BC.repeat_interleave(dim // BC.shape[1], dim=1)


def gate_output(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """`(y + D u) * silu(z)` in y's precision, cast to the input dtype (mamba-ssm's order of operations)."""
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype).view(-1, *([1] * (u.dim() - 2)))
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(out_dtype)
