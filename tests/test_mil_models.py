"""MIL aggregators: shapes, gradients, score alignment, the coordinate grid, bad bags."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mambascope.errors import DataError
from mambascope.models import create_model, list_models
from mambascope.models.mil import MILOutput
from mambascope.models.mil.grid import dense_ids, lattice_step, padded_size, patch_grid
from mambascope.models.mil.mambamil import (
    SEQUENCE_MULTIPLE,
    SEQUENCE_STEPS,
    sequence_layout,
)
from mambascope.train.mil_options import MIL_MODELS
from mil_helpers import IN_DIM, lattice_coords, single_thread, small_model  # noqa: F401


def test_mil_models_are_registered():
    assert set(MIL_MODELS) <= set(list_models())


@pytest.mark.parametrize("name", MIL_MODELS)
@pytest.mark.parametrize("n", [1, 10_000])
def test_forward_backward_any_bag_length(name, n):
    rng = np.random.default_rng(n)
    model = small_model(name)
    features = torch.randn(n, IN_DIM, requires_grad=True)
    coords = torch.from_numpy(lattice_coords(rng, n))
    out = model(features, coords)
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (3,)
    assert out.scores.shape == (n,)
    assert torch.all(out.scores >= 0)
    assert out.scores.sum().item() == pytest.approx(1.0, abs=1e-4)
    (out.logits.sum() + out.scores[0]).backward()
    assert torch.isfinite(features.grad).all()
    assert features.grad.abs().sum() > 0
    assert model.head.weight.grad.abs().sum() > 0
    if n > 1:  # with one patch the attention weight is 1 whatever its parameters, so only then
        moved = [p.grad is not None and p.grad.abs().sum().item() > 0 for p in model.parameters()]
        assert all(moved), [name for (name, _), ok in zip(model.named_parameters(), moved, strict=True) if not ok]


@pytest.mark.parametrize("name", ["abmil", "abmil-gated", "mamba2d"])
def test_scores_follow_their_patch_when_the_bag_is_shuffled(name):
    """Order-free models (mamba2d places patches by coords) give each patch the same score in any order."""
    rng = np.random.default_rng(1)
    model = small_model(name).eval()
    features = torch.randn(200, IN_DIM)
    coords = torch.from_numpy(lattice_coords(rng, 200))
    perm = torch.from_numpy(rng.permutation(200))
    with torch.no_grad():
        out = model(features, coords)
        shuffled = model(features[perm], coords[perm])
    torch.testing.assert_close(shuffled.scores, out.scores[perm], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(shuffled.logits, out.logits, rtol=1e-4, atol=1e-5)


def test_mamba2d_has_no_fixed_canvas():
    """Moving the slide or changing the tiling stride leaves the grid, and so the output, unchanged."""
    rng = np.random.default_rng(2)
    model = small_model("mamba2d").eval()
    features = torch.randn(150, IN_DIM)
    coords = torch.from_numpy(lattice_coords(rng, 150, step=256))
    moved = (coords - coords.min(0).values) * 2 + torch.tensor([100_000, 7])  # stride 512, far origin
    with torch.no_grad():
        a, b = model(features, coords), model(features, moved)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.scores, b.scores)


def test_grid_from_coordinates():
    coords = torch.tensor([[1000, 500], [1224, 500], [1448, 500], [1000, 724], [1448, 724],
                           [1000, 500 + 224 * 40]])  # stride 224, a far-away patch 40 rows down
    assert lattice_step(coords) == 224
    two_origins = torch.cat([coords[:5], coords[:5] + torch.tensor([3000 + 17, 3])])  # CLAM-like contours
    assert lattice_step(two_origins) == 224
    grid = patch_grid(coords, 6)
    rows, cols = grid.cell // grid.width, grid.cell % grid.width
    assert grid.width == 3
    assert rows.tolist() == [0, 0, 0, 1, 1, 3]  # the 38 empty rows shrink to one
    assert cols.tolist() == [0, 1, 2, 0, 2, 0]
    assert grid.num_cells == 6 and grid.share.tolist() == [1.0] * 6


def test_grid_cell_sharing_and_raster_fallback():
    coords = torch.tensor([[0, 0], [256, 0], [260, 3], [512, 0]])  # a patch of an offset lattice
    grid = patch_grid(coords, 4)
    assert grid.cell[1] == grid.cell[2]
    assert grid.num_cells == 3
    assert grid.share.tolist() == [1.0, 0.5, 0.5, 1.0]
    assert grid.occupied.tolist() == [True, True, True]  # one row of three cells
    model = small_model("mamba2d").eval()
    with torch.no_grad():
        out = model(torch.randn(4, IN_DIM), coords)
    assert out.scores.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert out.scores[1].item() == pytest.approx(out.scores[2].item())
    raster = patch_grid(None, 10)
    assert (raster.height, raster.width) == (3, 4)
    assert raster.cell.tolist() == list(range(10))


def test_grid_refuses_layouts_that_are_not_tissue():
    diagonal = torch.arange(2000).unsqueeze(1).repeat(1, 2) * 256
    with pytest.raises(DataError, match="2D tissue grid"):
        patch_grid(diagonal, 2000)


@pytest.mark.parametrize("values", [[7, 3, 3, 0, 9, 7], [5, 0, 5, 10**9, 3]])
def test_dense_ids_match_unique(values):
    """Both ways of numbering distinct values (a presence table over a small range, np.unique over a
    wide one) give np.unique's answer."""
    values = np.asarray(values)
    distinct, ids = dense_ids(values)
    expected_distinct, expected_ids = np.unique(values, return_inverse=True)
    assert distinct.tolist() == expected_distinct.tolist()
    assert ids.tolist() == expected_ids.tolist()


def test_reorder_order_visits_every_position():
    keep, order, unorder = sequence_layout(1000, 1000, 10, torch.device("cpu"))
    assert sorted(order.tolist()) == list(range(1000)) and bool(keep.all())
    assert order[:3].tolist() == [0, 10, 20] and order[100].item() == 1
    assert torch.equal(order[unorder], torch.arange(1000))


@pytest.mark.parametrize("name", MIL_MODELS)
def test_bad_bags_raise_data_errors(name):
    model = small_model(name)
    with pytest.raises(DataError, match="empty bag"):
        model(torch.zeros(0, IN_DIM))
    with pytest.raises(DataError, match="dimension 16"):
        model(torch.zeros(4, 16))
    with pytest.raises(DataError, match="coords"):
        model(torch.zeros(4, IN_DIM), torch.zeros(3, 2, dtype=torch.long))


def test_grid_moves_to_the_features_device_and_module_keeps_coords_on_host():
    """The grid is built on the host and handed over whole; the Lightning module moves every batch
    entry but the coords (the meta device stands in for a GPU)."""
    from mambascope.train.mil_module import MILModule

    coords = torch.tensor([[0, 0], [256, 0], [0, 256]])
    host_grid = patch_grid(coords, 3)
    # one tensor holds every part (a DataLoader hands one tensor over, one copy moves it to a GPU)
    parts = (host_grid.cell, host_grid.occupied, host_grid.share)
    assert {t.untyped_storage().data_ptr() for t in parts} == {host_grid.buffer.untyped_storage().data_ptr()}
    assert host_grid.occupied.tolist() == [True, True, True, False] and host_grid.share.tolist() == [1.0, 1.0, 1.0]
    grid = host_grid.to("meta")
    assert (grid.height, grid.width) == (2, 2)
    assert all(t.device.type == "meta" for t in (grid.cell, grid.occupied, grid.share))
    module = MILModule("abmil", IN_DIM, ["a", "b"])
    batch = {"features": torch.randn(3, IN_DIM), "coords": coords, "label": torch.tensor(1), "index": 0}
    moved = module.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["features"].device.type == "meta" and moved["label"].device.type == "meta"
    assert moved["coords"] is coords and moved["index"] == 0


def test_padded_size_ladder():
    """Grid sides round up to 16-multiples, with steps that double with the size (at most 1/8 more)."""
    assert [padded_size(n, 16) for n in (1, 16, 17, 114, 256, 257, 300, 513, 1000)] == \
        [16, 16, 32, 128, 256, 288, 320, 576, 1024]
    assert [padded_size(n, 1) for n in (1, 7, 114)] == [1, 7, 114]
    for n in range(1, 3000):
        size = padded_size(n, 16)
        assert size % 16 == 0 and n <= size <= max(n + 15, n * 9 / 8)


def test_bag_length_ladder():
    """mambamil's bag lengths on a GPU: 256-multiples, 4 a doubling past 2048, at most 1/4 more."""
    sizes = [padded_size(n, SEQUENCE_MULTIPLE, SEQUENCE_STEPS) for n in (1, 256, 257, 2048, 2049, 4097, 8001)]
    assert sizes == [256, 256, 512, 2048, 2560, 5120, 8192]
    for n in range(2049, 40000, 97):
        size = padded_size(n, SEQUENCE_MULTIPLE, SEQUENCE_STEPS)
        assert n <= size <= n * 5 / 4


def test_mambamil_pads_bags_for_graphs_only_in_gpu_training_up_to_its_limit():
    model = small_model("mambamil")
    cuda = torch.device("cuda")  # only its type is read
    assert model.graph_length(1000, cuda) == 1024
    assert model.graph_length(8192, cuda) == 8192 and model.graph_length(8193, cuda) is None
    assert model.graph_length(1000, torch.device("cpu")) is None
    with torch.no_grad():
        assert model.graph_length(1000, cuda) is None
    assert create_model("mambamil", in_dim=IN_DIM, num_classes=2, cuda_graphs=0).graph_length(1000, cuda) is None
    assert create_model("mambamil", in_dim=IN_DIM, num_classes=2, graph_max_length=4096).graph_length(5000, cuda) is None


def test_sequence_layout_reorders_real_tokens_and_leaves_padding_last():
    keep, order, unorder = sequence_layout(7, 10, 3, torch.device("cpu"))
    assert keep.tolist() == [True] * 7 + [False] * 3
    assert order.tolist() == [0, 3, 6, 1, 4, 2, 5, 7, 8, 9]
    x = torch.arange(10)
    assert torch.equal(x.index_select(0, order).index_select(0, unorder), x)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("rate", [1, 4])
def test_mambamil_results_do_not_depend_on_bag_padding(bidirectional, rate):
    """In GPU training a bag is padded at its end to a ladder length (`graph_length`); logits, scores and
    every gradient are those of the unpadded bag (float64 on the CPU, the model told to pad). A walk from
    the end (bidirectional) would start in the padding if its Δ were not zeroed there."""
    torch.manual_seed(rate)
    tight = create_model("mambamil", in_dim=IN_DIM, num_classes=3, dim=16, depth=2, d_state=4, attn_dim=16,
                         reorder_rate=rate, bidirectional=bidirectional, dropout=0.0).double()
    padded = copy.deepcopy(tight)
    padded.graph_length = lambda length, device: 48
    features = torch.randn(37, IN_DIM, dtype=torch.float64)
    results = []
    for model in (tight, padded):
        out = model(features)
        (out.logits.square().sum() + (out.scores * torch.arange(37)).sum()).backward()
        results.append((out.logits, out.scores, [p.grad for p in model.parameters()]))
    (logits, scores, grads), (logits_p, scores_p, grads_p) = results
    assert scores_p.shape == (37,)
    torch.testing.assert_close(logits_p, logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(scores_p, scores, rtol=0, atol=1e-12)
    for g, g_p in zip(grads, grads_p, strict=True):
        torch.testing.assert_close(g_p, g, rtol=0, atol=1e-12)


def test_mamba2d_results_do_not_depend_on_grid_padding():
    """On a GPU the grid is padded with masked rows below and columns to the right (`padded_size`);
    outputs and gradients are those of the tight grid (checked on the CPU by handing the model a padded
    grid)."""
    rng = np.random.default_rng(5)
    model = small_model("mamba2d").eval()
    features = torch.randn(90, IN_DIM)
    coords = torch.from_numpy(lattice_coords(rng, 90, step=256))
    tight_grid, padded_grid = patch_grid(coords, 90), patch_grid(coords, 90, multiple=16)
    assert (tight_grid.height, tight_grid.width) == (13, 13) and (padded_grid.height, padded_grid.width) == (16, 16)
    assert model.grid_multiple("cpu") == 1 and model.grid_multiple("cuda") == 16
    results = []
    for grid in (tight_grid, padded_grid):
        model.zero_grad(set_to_none=True)
        out = model(features, coords, grid=grid)
        (out.logits[0] * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
        results.append((out.logits.detach(), out.scores.detach(), [p.grad for p in model.parameters()]))
    (tight_logits, tight_scores, tight_grads), (logits, scores, grads) = results
    torch.testing.assert_close(logits, tight_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores, tight_scores, rtol=1e-5, atol=1e-7)
    assert all(g.abs().sum() > 0 for g in tight_grads)
    for grad, tight in zip(grads, tight_grads, strict=True):
        torch.testing.assert_close(grad, tight, rtol=1e-4, atol=1e-6)
    with pytest.raises(DataError, match="grid places 89 patches but the bag has 90"):
        model(features, coords, grid=patch_grid(coords[:89], 89))
