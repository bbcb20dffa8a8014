"""The `mamba_ssm` backend: mamba-ssm's fused CUDA selective scan, when that package is installed.

Its kernel wants A, D and delta_bias in float32 (the weights' precision) and u, delta, B, C in one
input dtype; everything else (grouped B/C, z gate, last state) it takes as `selective_scan` does.
"""

from __future__ import annotations

from torch import Tensor


def selective_scan_mamba_ssm(
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
    """1D selective scan through `mamba_ssm.ops.selective_scan_interface.selective_scan_fn` (CUDA only)."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    def weight(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.float()

    return selective_scan_fn(
        u, delta.to(u.dtype), A.float(), B, C, weight(D), z,
        weight(delta_bias), delta_softplus, return_last_state,
    )
