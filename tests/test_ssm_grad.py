"""Gradients of the scans: gradcheck on tiny float64 shapes, and backend gradients against the reference."""

from __future__ import annotations

import pytest
import torch

import mambascope.ssm.torch_scan as torch_scan
from mambascope.ssm import selective_scan, selective_scan_2d
from ssm_helpers import as_float64, relative_error, scan_args

TENSOR_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(torch_scan, "BLOCK_ELEMENTS", 1)


def gradcheck_scan(scan, args: dict, **options) -> bool:
    names = [n for n in TENSOR_NAMES if args[n] is not None]
    leaves = [args[n].clone().requires_grad_(True) for n in names]

    def fn(*tensors):
        result = scan(**{**args, **dict(zip(names, tensors, strict=True))}, **options)
        return result if isinstance(result, tuple) else (result,)

    return torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("groups", [None, 2])
def test_gradcheck_1d(backend, groups, small_blocks):
    args = as_float64(scan_args(2, 4, (7,), 3, groups=groups, seed=11))
    assert gradcheck_scan(selective_scan, args, delta_softplus=True, return_last_state=True, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck_2d_with_mask(backend, small_blocks):
    args = as_float64(scan_args(2, 2, (3, 5), 2, seed=12))
    mask = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    assert gradcheck_scan(selective_scan_2d, args, delta_softplus=True, mask=mask, backend=backend)


def test_gradcheck_1d_length_one():
    args = as_float64(scan_args(1, 3, (1,), 2, seed=13))
    assert gradcheck_scan(selective_scan, args, return_last_state=True, backend="torch")


def _grads(scan, args: dict, backend: str, **options) -> dict[str, torch.Tensor]:
    leaves = {n: v.clone().requires_grad_(True) for n, v in args.items() if v is not None}
    result = scan(**{**args, **leaves}, backend=backend, **options)
    outputs = result if isinstance(result, tuple) else (result,)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64).to(o.dtype)
               for i, o in enumerate(outputs)]
    loss = sum((o * w).sum() for o, w in zip(outputs, weights, strict=True))
    loss.backward()
    return {n: leaf.grad for n, leaf in leaves.items()}


def test_torch_1d_gradients_match_reference_float32(small_blocks):
    args = scan_args(2, 6, (61,), 5, groups=3, seed=14)
    ref = _grads(selective_scan, as_float64(args), "reference", delta_softplus=True, return_last_state=True)
    got = _grads(selective_scan, args, "torch", delta_softplus=True, return_last_state=True)
    for name in ref:
        assert got[name].dtype == torch.float32
        assert relative_error(got[name], ref[name]) < 1e-4, name


def test_torch_2d_gradients_match_reference_float32(small_blocks):
    args = scan_args(2, 4, (6, 9), 4, seed=15)
    mask = torch.rand(2, 6, 9, generator=torch.Generator().manual_seed(2)) > 0.25
    ref = _grads(selective_scan_2d, as_float64(args), "reference", delta_softplus=True, mask=mask)
    got = _grads(selective_scan_2d, args, "torch", delta_softplus=True, mask=mask)
    for name in ref:
        assert relative_error(got[name], ref[name]) < 1e-4, name
