"""2D selective scan: against a naive per-cell double loop, masks, and the 1D special case."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mambascope.ssm.torch_scan as torch_scan
from mambascope.ssm import selective_scan, selective_scan_2d
from ssm_helpers import as_float64, relative_error, scan_args

BACKENDS = ["reference", "torch"]


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(torch_scan, "BLOCK_ELEMENTS", 1)


def naive_2d(u, delta, A, B, C, D, z, delta_bias, mask, softplus=True):
    """The issue's recurrence written out cell by cell and channel by channel, in float64."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, dim, H, W = u.shape
    out = torch.zeros(batch, dim, H, W, dtype=torch.float64)
    for b in range(batch):
        for d in range(dim):
            row = torch.zeros(H, W, A.shape[1], dtype=torch.float64)
            col = torch.zeros(H, W, A.shape[1], dtype=torch.float64)
            for i in range(H):
                for j in range(W):
                    dt = delta[b, d, i, j] + (0 if delta_bias is None else delta_bias[d].double())
                    dt = F.softplus(dt) if softplus else dt
                    if mask is not None and not mask[b, i, j]:
                        dt = dt * 0
                    decay = torch.exp(dt * A[d])
                    left = row[i, j - 1] if j > 0 else 0
                    row[i, j] = decay * left + dt * B[b, :, i, j] * u[b, d, i, j]
                    up = col[i - 1, j] if i > 0 else 0
                    col[i, j] = decay * up + row[i, j]
                    y = (col[i, j] * C[b, :, i, j]).sum()
                    if D is not None:
                        y = y + D[d].double() * u[b, d, i, j]
                    if z is not None:
                        y = y * F.silu(z[b, d, i, j].double())
                    out[b, d, i, j] = y
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("H", "W"), [(3, 5), (6, 2), (1, 7), (4, 1)])
@pytest.mark.parametrize("masked", [False, True], ids=["full", "masked"])
def test_matches_naive_double_loop(backend, H, W, masked, small_blocks):
    args = scan_args(2, 3, (H, W), 4, seed=H * 10 + W)
    mask = None
    if masked:
        mask = torch.rand(2, H, W, generator=torch.Generator().manual_seed(H + W)) > 0.35
    expected = naive_2d(**args, mask=mask)
    out = selective_scan_2d(**args, delta_softplus=True, mask=mask, backend=backend)
    assert out.shape == (2, 3, H, W) and out.dtype == torch.float32
    assert relative_error(out, expected) < 2e-5


def test_torch_matches_reference_on_wide_grid_with_many_blocks(small_blocks):
    args = scan_args(1, 8, (13, 41), 16, seed=4)
    mask = torch.ones(1, 13, 41, dtype=torch.bool)
    mask[:, 9:, 30:] = False  # a ragged slide outline
    ref = selective_scan_2d(**as_float64(args), delta_softplus=True, mask=mask, backend="reference")
    out = selective_scan_2d(**args, delta_softplus=True, mask=mask, backend="torch")
    assert relative_error(out, ref) < 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_cells_do_not_affect_real_cells(backend, small_blocks):
    args = scan_args(2, 4, (5, 6), 3, seed=21)
    mask = torch.rand(2, 5, 6, generator=torch.Generator().manual_seed(3)) > 0.4
    out = selective_scan_2d(**args, delta_softplus=True, mask=mask, backend=backend)
    noisy = dict(args)
    pad = ~mask
    gen = torch.Generator().manual_seed(9)
    for name in ("u", "delta", "z"):
        noise = torch.randn(args[name].shape, generator=gen) * 10
        noisy[name] = torch.where(pad.unsqueeze(1), noise, args[name])
    for name in ("B", "C"):
        noise = torch.randn(args[name].shape, generator=gen) * 10
        noisy[name] = torch.where(pad.unsqueeze(1), noise, args[name])
    changed = selective_scan_2d(**noisy, delta_softplus=True, mask=mask, backend=backend)
    real = mask.unsqueeze(1).expand_as(out)
    torch.testing.assert_close(changed[real], out[real], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(changed[~real], out[~real])  # the noise did reach the padded cells


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_masked_row_equals_1d_scan_over_real_cells(backend):
    args = scan_args(1, 5, (1, 11), 4, seed=8)
    mask = torch.tensor([[[True, False, False, True, True, False, True, False, True, True, False]]])
    out = selective_scan_2d(**args, delta_softplus=True, mask=mask, backend=backend)
    keep = mask[0, 0]
    sequence = {
        "u": args["u"][:, :, 0, keep], "delta": args["delta"][:, :, 0, keep], "z": args["z"][:, :, 0, keep],
        "B": args["B"][:, :, 0, keep], "C": args["C"][:, :, 0, keep],
        "A": args["A"], "D": args["D"], "delta_bias": args["delta_bias"],
    }
    expected = selective_scan(**sequence, delta_softplus=True, backend="reference")
    torch.testing.assert_close(out[:, :, 0, keep], expected, rtol=1e-5, atol=1e-6)


def test_grid_with_one_row_equals_1d_scan():
    args = scan_args(2, 3, (1, 9), 4, groups=3, seed=5)
    out = selective_scan_2d(**args, backend="torch")
    flat = {k: (v.squeeze(-2) if v is not None and v.dim() > 2 else v) for k, v in args.items()}
    torch.testing.assert_close(out.squeeze(2), selective_scan(**flat, backend="reference"))


def test_column_pass_couples_rows():
    """A single impulse at the top-left cell reaches every cell below and to the right, not above/left."""
    args = scan_args(1, 1, (4, 4), 2, D=False, z=False, delta_bias=False, seed=6)
    args["u"] = torch.zeros(1, 1, 4, 4)
    args["u"][0, 0, 1, 1] = 1.0
    args["C"] = torch.ones_like(args["C"])
    args["B"] = torch.ones_like(args["B"])
    out = selective_scan_2d(**args, delta_softplus=True, backend="torch")[0, 0]
    assert (out[1:, 1:] > 0).all()
    assert (out[:1] == 0).all() and (out[:, :1] == 0).all()


def test_mask_must_be_boolean():
    args = scan_args(1, 2, (2, 3), 2)
    with pytest.raises(ValueError, match="mask"):
        selective_scan_2d(**args, mask=torch.ones(1, 2, 3))
