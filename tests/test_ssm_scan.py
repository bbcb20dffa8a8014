"""1D selective scan: every available backend against the float64 sequential reference, and dispatch.

Tolerance: relative max error (max |out - ref| / max |ref|) below 2e-5 for float32 inputs (float32
accumulation over a few hundred steps), 1e-12 for float64 and 2e-3 for float16/bfloat16 outputs.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import mambascope.ssm.torch_scan as torch_scan
from mambascope.errors import ConfigError
from mambascope.ssm import available_backends, selective_scan
from mambascope.ssm.dispatch import resolve_backend
from mambascope.ssm.reference import selective_scan_reference
from ssm_helpers import as_float64, relative_error, scan_args

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def backend_device(backend: str) -> str:
    """The device a backend runs on in these tests; skip when it cannot run here."""
    if not available_backends()[backend]:
        pytest.skip(f"backend {backend} not available here")
    if backend == "mamba_ssm" or (backend == "triton" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        return "cuda"
    return "cpu"


FAST_BACKENDS = ["torch", "triton", "mamba_ssm"]

CASES = [
    # (batch, dim, L, N, groups, D/z/bias, softplus)
    pytest.param(2, 6, 37, 4, None, True, True, id="odd-L-all-options"),
    pytest.param(1, 4, 1, 3, None, True, False, id="L=1"),
    pytest.param(3, 8, 64, 5, 2, True, True, id="grouped-2"),
    pytest.param(2, 8, 50, 4, 8, False, True, id="grouped-per-channel-no-extras"),
    pytest.param(2, 5, 29, 16, None, False, False, id="plain"),
]


@pytest.fixture
def small_blocks(monkeypatch):
    """Force the torch backend into many column blocks (and a ragged last block)."""
    monkeypatch.setattr(torch_scan, "BLOCK_ELEMENTS", 1)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(("batch", "dim", "L", "N", "groups", "extras", "softplus"), CASES)
def test_backend_matches_reference(backend, batch, dim, L, N, groups, extras, softplus, small_blocks):
    device = backend_device(backend)
    args = scan_args(batch, dim, (L,), N, groups=groups, D=extras, z=extras, delta_bias=extras, seed=L + dim)
    ref, ref_state = selective_scan_reference(**as_float64(args), delta_softplus=softplus, return_last_state=True)
    moved = {k: None if v is None else v.to(device) for k, v in args.items()}
    out, state = selective_scan(**moved, delta_softplus=softplus, return_last_state=True, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (batch, dim, L)
    assert state.shape == (batch, dim, N)
    assert relative_error(out.cpu(), ref) < TOLERANCE[torch.float32]
    assert relative_error(state.cpu(), ref_state) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reverse_is_the_forward_scan_of_flipped_sequences(backend, dtype):
    """`reverse=True` (in the Triton kernels: reversed loads and stores, rows padded on the left) against
    the float64 reference run on flipped copies: output, last state and every gradient."""
    device = backend_device(backend)
    args = scan_args(2, 8, (45,), 4, groups=2, D=True, z=True, delta_bias=True, seed=3)
    args = {k: v.to(device=device, dtype=dtype if k in ("u", "delta", "B", "C", "z") else v.dtype)
            for k, v in args.items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    out, state = selective_scan(**leaves, delta_softplus=True, return_last_state=True, reverse=True, backend=backend)
    wide = {k: v.detach().cpu().double().requires_grad_(True) for k, v in args.items()}
    flipped = {k: (v.flip(-1) if k in ("u", "delta", "B", "C", "z") else v) for k, v in wide.items()}
    ref, ref_state = selective_scan_reference(**flipped, delta_softplus=True, return_last_state=True)
    ref = ref.flip(-1)
    tol = TOLERANCE[dtype]
    assert relative_error(out.detach().cpu(), ref.detach()) < tol
    assert relative_error(state.detach().cpu(), ref_state.detach()) < tol
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (out.double().cpu() * weights).sum().backward()
    (ref * weights).sum().backward()
    for name, leaf in leaves.items():
        assert relative_error(leaf.grad.cpu(), wide[name].grad) < 5 * tol, name


def test_torch_backend_float64_is_exact_to_rounding(small_blocks):
    args = as_float64(scan_args(2, 6, (101,), 8, groups=3, seed=3))
    ref = selective_scan_reference(**args, delta_softplus=True)
    out = selective_scan(**args, delta_softplus=True, backend="torch")
    assert out.dtype == torch.float64
    assert relative_error(out, ref) < TOLERANCE[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    args = scan_args(2, 8, (200,), 8, dtype=dtype, seed=5)
    ref, ref_state = selective_scan_reference(**as_float64(args), delta_softplus=True, return_last_state=True)
    out, state = selective_scan(**args, delta_softplus=True, return_last_state=True, backend="torch")
    assert out.dtype == dtype and state.dtype == torch.float32
    assert relative_error(out, ref) < TOLERANCE[dtype]
    assert relative_error(state, ref_state) < 1e-5  # the state never passes through half precision


def test_reference_returns_input_dtype_and_float32_state_for_half():
    args = scan_args(1, 2, (5,), 3, dtype=torch.float16)
    out, state = selective_scan_reference(**args, return_last_state=True)
    assert out.dtype == torch.float16 and state.dtype == torch.float32


def test_extreme_steps_stay_finite_and_exact(small_blocks):
    """Δ = 0 (decay exactly 1) and Δ = 60 (decay underflows to 0) must not produce inf/NaN."""
    args = scan_args(1, 4, (90,), 16, seed=7, delta_bias=False)
    delta = torch.zeros(1, 4, 90)
    delta[:, :, ::3] = 60.0
    args["delta"] = delta
    ref = selective_scan_reference(**as_float64(args))
    out = selective_scan(**args, backend="torch")
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) < TOLERANCE[torch.float32]


def test_known_values_single_channel():
    """h_t = e^{-Δ} h_{t-1} + Δ u_t with B = C = 1, Δ = ln 2, u = (1, 0, 2): h = ln2·(1, 1/2, 9/4)."""
    ln2 = torch.log(torch.tensor(2.0, dtype=torch.float64))
    u = torch.tensor([[[1.0, 0.0, 2.0]]], dtype=torch.float64)
    delta = torch.full_like(u, float(ln2))
    A = -torch.ones(1, 1, dtype=torch.float64)
    B = torch.ones(1, 1, 3, dtype=torch.float64)
    expected = ln2 * torch.tensor([1.0, 0.5, 2.25], dtype=torch.float64)
    for backend in ("reference", "torch"):
        out = selective_scan(u, delta, A, B, B.clone(), backend=backend)
        torch.testing.assert_close(out[0, 0], expected)


def test_reverse_walks_from_the_last_position_known_values():
    """Walked from the end with B = C = 1, Δ = ln 2, u = (1, 0, 2): h_2 = 2 ln2, h_1 = h_2 / 2 = ln2,
    h_0 = h_1 / 2 + ln2 = 1.5 ln2; the last state is the one after position 0; each sequence walks alone."""
    ln2 = torch.log(torch.tensor(2.0, dtype=torch.float64))
    u = torch.tensor([[[1.0, 0.0, 2.0]], [[0.0, 0.0, 1.0]]], dtype=torch.float64)
    delta = torch.full_like(u, float(ln2))
    A = -torch.ones(1, 1, dtype=torch.float64)
    B = torch.ones(2, 1, 3, dtype=torch.float64)
    expected = ln2 * torch.tensor([[1.5, 1.0, 2.0], [0.25, 0.5, 1.0]], dtype=torch.float64)
    for backend in ("reference", "torch"):
        out, last = selective_scan(u, delta, A, B, B.clone(), return_last_state=True, reverse=True, backend=backend)
        torch.testing.assert_close(out[:, 0], expected)
        torch.testing.assert_close(last[:, 0, 0], expected[:, 0])


def test_auto_picks_torch_on_cpu():
    u = torch.zeros(1, 2, 3)
    assert resolve_backend("auto", u, two_d=False) == "torch"
    assert resolve_backend("auto", u, two_d=True) == "torch"


def test_auto_picks_triton_on_cuda_even_with_mamba_ssm_installed(monkeypatch):
    from mambascope.ssm import dispatch

    class CudaLike:
        is_cuda = True

    everything = {"reference": True, "torch": True, "triton": True, "mamba_ssm": True}
    monkeypatch.setattr(dispatch, "available_backends", lambda: everything)
    assert resolve_backend("auto", CudaLike(), two_d=False) == "triton"
    assert resolve_backend("auto", CudaLike(), two_d=True) == "triton"
    monkeypatch.setattr(dispatch, "available_backends", lambda: {**everything, "triton": False})
    assert resolve_backend("auto", CudaLike(), two_d=False) == "torch"


def test_unknown_or_unavailable_backend_is_a_config_error():
    args = scan_args(1, 2, (4,), 2)
    with pytest.raises(ConfigError, match="unknown scan backend"):
        selective_scan(**args, backend="cuda-magic")
    if not available_backends()["mamba_ssm"]:
        with pytest.raises(ConfigError, match="not available"):
            selective_scan(**args, backend="mamba_ssm")


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("delta", torch.zeros(1, 2, 5)),
        ("A", torch.zeros(3, 2)),
        ("B", torch.zeros(1, 3, 4)),
        ("C", torch.zeros(1, 3, 2, 4)),  # 3 groups do not divide dim=2
        ("B and C", torch.zeros(1, 2, 2, 4)),  # C grouped (2 groups), B not: the groups must agree
        ("D", torch.zeros(3)),
        ("z", torch.zeros(2, 2, 4)),
    ],
)
def test_shape_mistakes_name_the_argument(name, bad):
    args = scan_args(1, 2, (4,), 2)
    args[name.split()[-1]] = bad
    with pytest.raises(ValueError, match=name):
        selective_scan(**args)


def test_available_backends_reports_triton_only_with_gpu_or_interpreter(monkeypatch):
    assert available_backends()["reference"] and available_backends()["torch"]
    triton_installed = importlib.util.find_spec("triton") is not None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert available_backends()["triton"] == triton_installed
    monkeypatch.delenv("TRITON_INTERPRET")
    assert available_backends()["triton"] == (triton_installed and torch.cuda.is_available())
    assert available_backends()["mamba_ssm"] == (importlib.util.find_spec("mamba_ssm") is not None)


def test_torch_backend_memory_is_bounded_by_the_block(monkeypatch):
    """No operation of forward or backward allocates anything near the full (batch, dim, L, N) states."""
    from torch.profiler import profile

    monkeypatch.setattr(torch_scan, "BLOCK_ELEMENTS", 1 << 16)
    batch, dim, L, N = 1, 64, 1024, 16
    args = scan_args(batch, dim, (L,), N, D=False, z=False, delta_bias=False, seed=2)
    args = {k: v.requires_grad_(True) if v is not None else None for k, v in args.items()}
    with profile(profile_memory=True) as prof:
        selective_scan(**args, delta_softplus=True, backend="torch").sum().backward()
    full_state_bytes = batch * dim * L * N * 4
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert 0 < largest <= full_state_bytes // 4
