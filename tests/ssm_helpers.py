"""Random selective-scan arguments for the ssm tests."""

from __future__ import annotations

import torch


def scan_args(
    batch: int,
    dim: int,
    spatial: tuple[int, ...],
    n_state: int,
    *,
    groups: int | None = None,
    D: bool = True,
    z: bool = True,
    delta_bias: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    """Keyword arguments for selective_scan / selective_scan_2d: spatial is (L,) or (H, W).

    Δ is centred so that, with softplus, it spans small and large steps; A is negative with a spread
    of decay rates like the S4D-real initialisation.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    bc_shape = (batch, n_state, *spatial) if groups is None else (batch, groups, n_state, *spatial)
    A = -(0.5 + torch.rand(dim, n_state, generator=gen, dtype=torch.float64) * 2).to(dtype)
    return {
        "u": randn(batch, dim, *spatial),
        "delta": (randn(batch, dim, *spatial) * 0.5 - 1.0).to(dtype),
        "A": A,
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
        "D": randn(dim) if D else None,
        "z": randn(batch, dim, *spatial) if z else None,
        "delta_bias": (randn(dim) * 0.5) if delta_bias else None,
    }


def as_float64(args: dict) -> dict:
    """The same arguments in float64 (None stays None)."""
    return {k: None if v is None else v.to(torch.float64) for k, v in args.items()}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: scale-free, so one tolerance serves every shape."""
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))
