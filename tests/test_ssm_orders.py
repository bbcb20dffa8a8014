"""Scan orders: cross-scan/merge, bidirectional and SegMamba's 3D walks as index maps."""

from __future__ import annotations

import pytest
import torch

from mambascope.ssm import (
    bidirectional_orders,
    cross_merge,
    cross_scan,
    reverse_order,
    selective_scan,
    tri_orientation_orders,
)


def test_cross_scan_walks():
    x = torch.arange(6.0).view(1, 1, 2, 3)  # [[0 1 2], [3 4 5]]
    walks = cross_scan(x)[0, :, 0]
    assert walks.tolist() == [
        [0, 1, 2, 3, 4, 5],  # row-major
        [0, 3, 1, 4, 2, 5],  # column-major
        [5, 4, 3, 2, 1, 0],
        [5, 2, 4, 1, 3, 0],
    ]


@pytest.mark.parametrize(("H", "W"), [(3, 5), (4, 4), (1, 7)])
def test_merge_of_identity_scan_recovers_input(H, W):
    """Identity dynamics (C = 0, D = 1: the scan outputs its input) through all four walks sum to 4x."""
    gen = torch.Generator().manual_seed(H * W)
    x = torch.randn(2, 3, H, W, generator=gen)
    walks = cross_scan(x)  # (2, 4, 3, L)
    u = walks.reshape(2, 12, H * W)
    n_state = 4
    zeros = torch.zeros(2, 4, n_state, H * W)
    scanned = selective_scan(u, torch.rand(u.shape, generator=gen), -torch.ones(12, n_state),
                             torch.randn(zeros.shape, generator=gen), zeros, D=torch.ones(12))
    merged = cross_merge(scanned.view(2, 4, 3, H * W), H, W)
    torch.testing.assert_close(merged.view(2, 3, H, W), 4 * x)


def test_cross_merge_is_adjoint_of_cross_scan():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 3, 5, generator=gen)
    y = torch.randn(1, 4, 2, 15, generator=gen)
    lhs = (cross_scan(x) * y).sum()
    rhs = (x.flatten(2) * cross_merge(y, 3, 5)).sum()
    torch.testing.assert_close(lhs, rhs)


def test_reverse_and_bidirectional_orders():
    order = reverse_order(5)
    x = torch.arange(10).view(2, 5)
    assert order.apply(x).tolist() == [[4, 3, 2, 1, 0], [9, 8, 7, 6, 5]]
    assert torch.equal(order.restore(order.apply(x)), x)
    forward, backward = bidirectional_orders(4)
    assert forward.perm.tolist() == [0, 1, 2, 3] and backward.perm.tolist() == [3, 2, 1, 0]


@pytest.mark.parametrize("shape", [(3, 5, 7), (1, 1, 1), (5, 3, 1), (2, 3, 4)])
def test_tri_orientation_orders_are_permutations_with_inverses(shape):
    D, H, W = shape
    n = D * H * W
    orders = tri_orientation_orders(D, H, W)
    assert len(orders) == 3
    identity = torch.arange(n)
    for perm, inverse in orders:
        assert perm.dtype == torch.long and inverse.dtype == torch.long
        assert torch.equal(perm.sort().values, identity)
        assert torch.equal(perm[inverse], identity) and torch.equal(inverse[perm], identity)
    forward, reverse, inter = (perm for perm, _ in orders)
    assert torch.equal(forward, identity)
    assert torch.equal(reverse, identity.flip(0))
    # inter-slice: consecutive tokens walk through depth at one (h, w) position
    coords = torch.stack(torch.unravel_index(inter, (D, H, W)), dim=1)
    assert coords[:D, 0].tolist() == list(range(D))
    assert (coords[:D, 1:] == coords[0, 1:]).all()


def test_inter_slice_order_on_a_volume():
    D, H, W = 3, 2, 5
    volume = torch.randn(2, 4, D, H, W, generator=torch.Generator().manual_seed(1))
    perm, inverse = tri_orientation_orders(D, H, W)[2]
    tokens = volume.flatten(2).index_select(-1, perm)
    expected = volume.permute(0, 1, 3, 4, 2).flatten(2)  # (h, w) outer, depth inner
    assert torch.equal(tokens, expected)
    assert torch.equal(tokens.index_select(-1, inverse).view_as(volume), volume)
