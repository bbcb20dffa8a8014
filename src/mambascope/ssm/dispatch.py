"""The public scans and the choice of backend behind them.

`selective_scan` / `selective_scan_2d` check their arguments once, pick a backend (`backend="auto"`:
mamba-ssm's CUDA kernel for 1D CUDA tensors when installed, else the Triton kernels on CUDA, else the
chunked `torch` scan) and call it. Backends that need optional packages are imported only when chosen.
`depthwise_conv_silu`, the conv in front of a scan (Mamba's 1D, Mamba2D's 2D), follows the same choice
between Triton and PyTorch.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambascope.errors import ConfigError
from mambascope.ssm.reference import selective_scan_2d_reference, selective_scan_reference
from mambascope.ssm.scan_inputs import check_scan_args
from mambascope.ssm.torch_scan import selective_scan_2d_torch, selective_scan_torch

BACKENDS = ("auto", "reference", "torch", "triton", "mamba_ssm")


@functools.cache
def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # a broken optional install is "not available", whatever it raises
        return False
    return True


def available_backends() -> dict[str, bool]:
    """Which scan backends can run here (`mambascope doctor` prints this).

    triton needs the package and either a CUDA device or TRITON_INTERPRET=1 (Triton's CPU interpreter);
    mamba_ssm needs the mamba-ssm package (its kernels are CUDA-only).
    """
    gpu_or_interpreter = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    return {
        "reference": True,
        "torch": True,
        "triton": gpu_or_interpreter and _imports("triton"),
        "mamba_ssm": _imports("mamba_ssm.ops.selective_scan_interface"),
    }


def resolve_backend(backend: str, u: Tensor, two_d: bool) -> str:
    """The concrete backend for `backend` on u's device; ConfigError when it cannot run."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown scan backend {backend!r}", hint=f"choose one of: {', '.join(BACKENDS)}")
    available = available_backends()
    if backend == "auto":
        if u.is_cuda and available["triton"]:
            return "triton"
        return "torch"
    if backend == "mamba_ssm" and two_d:
        raise ConfigError("the mamba_ssm backend has no 2D scan", hint="use backend 'triton', 'torch' or 'auto'")
    if not available[backend]:
        raise ConfigError(
            f"scan backend {backend!r} is not available here",
            hint="install mamba-ssm on a CUDA machine" if backend == "mamba_ssm"
            else "triton needs a CUDA GPU (or TRITON_INTERPRET=1); use backend 'torch' or 'auto'",
        )
    if backend == "mamba_ssm" and not u.is_cuda:
        raise ConfigError("the mamba_ssm backend needs CUDA tensors", hint="move the inputs to a GPU or use 'auto'")
    return backend


def selective_scan(
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
    reverse: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan over sequences with mamba-ssm `selective_scan_fn` semantics.

    u, delta, z: (batch, dim, L); A: (dim, N) real; B, C: (batch, N, L) or grouped (batch, G, N, L)
    (channel c uses group c // (dim / G)); D, delta_bias: (dim,). Δ = softplus(delta + delta_bias)
    when `delta_softplus`; `h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t`, `y_t = C_t h_t`,
    `out = (y + D u) * silu(z)` in u's dtype (float32 accumulation for half inputs).
    `reverse` walks each sequence from its last position to its first (`h_t` then follows `h_{t+1}`),
    the same as flipping every input and the output along L; the Triton kernels do it in their loads
    and stores, the other backends on flipped copies.
    Returns out, or (out, last state (batch, dim, N)) with `return_last_state` (the state after the
    walk's last step: position 0 when `reverse`).
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u, two_d=False)
    if name == "triton":
        from mambascope.ssm.triton_scan import selective_scan_triton

        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse)
    if reverse:
        u, delta, B, C, z = (t.flip(-1) if t is not None else None for t in (u, delta, B, C, z))
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "reference":
        result = selective_scan_reference(*args)
    elif name == "torch":
        result = selective_scan_torch(*args)
    else:
        from mambascope.ssm.mamba_ssm_scan import selective_scan_mamba_ssm

        result = selective_scan_mamba_ssm(*args)
    if not reverse:
        return result
    if return_last_state:
        return result[0].flip(-1), result[1]
    return result.flip(-1)


def selective_scan_2d(
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
    backend: str = "auto",
) -> Tensor:
    """Selective scan over (H, W) grids: the 2DMamba recurrence.

    u, delta, z: (batch, dim, H, W); A: (dim, N); B, C: (batch, N, H, W) (or grouped (batch, G, N, H, W));
    mask: (batch, H, W) bool, True on real cells. Row pass `r[i,j] = Ā r[i,j-1] + B̄ x`, column pass
    `h[i,j] = Ā h[i-1,j] + r[i,j]`, `y = C h`, then D skip and z gate as in 1D. A masked cell has Δ = 0:
    state passes through and the cell adds nothing, so real cells never depend on padded cells' inputs.
    Outputs at masked cells are defined but meaningless; callers ignore or zero them.
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, mask, spatial_dims=2)
    name = resolve_backend(backend, u, two_d=True)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, mask)
    if name == "reference":
        return selective_scan_2d_reference(*args)
    if name == "torch":
        return selective_scan_2d_torch(*args)
    from mambascope.ssm.triton_scan2d import selective_scan_2d_triton

    return selective_scan_2d_triton(*args)


def depthwise_conv_silu(conv: nn.Conv1d | nn.Conv2d, x: Tensor, backend: str = "auto", reverse: bool = False) -> Tensor:
    """SiLU(conv(x)) for the depthwise conv in front of a scan: a Conv2d with an odd "same" kernel (Mamba2D),
    or Mamba's causal Conv1d (padding K - 1, the first L outputs kept; with `reverse`, the conv of a walk
    from the end: the flipped kernel, the last L outputs). One fused Triton kernel each way where the
    scan's backend resolves to Triton (`ssm.triton_dwconv`), PyTorch's ops else."""
    depthwise = conv.groups == conv.in_channels == conv.out_channels and conv.bias is not None
    if isinstance(conv, nn.Conv2d):
        odd = conv.kernel_size[0] == conv.kernel_size[1] and conv.kernel_size[0] % 2 == 1
        fits = odd and conv.padding == "same" and x.dim() == 4
    else:
        fits = conv.padding == (conv.kernel_size[0] - 1,) and x.dim() == 3
    if depthwise and fits and resolve_backend(backend, x, two_d=x.dim() == 4) == "triton":
        from mambascope.ssm.triton_dwconv import depthwise_conv_silu_triton

        return depthwise_conv_silu_triton(x, conv.weight, conv.bias, reverse=reverse)
    if x.dim() == 4:
        return F.silu(conv(x))
    L = x.shape[-1]
    if reverse:
        return F.silu(F.conv1d(x, conv.weight.flip(-1), conv.bias, padding=conv.padding, groups=conv.groups)[..., -L:])
    return F.silu(conv(x)[..., :L])
