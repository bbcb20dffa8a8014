"""HistoMamba and Microscopic-Mamba: sizes, shapes, gradients reaching every parameter, bad configs."""

from __future__ import annotations

import pytest
import torch

from mambascope.errors import ConfigError
from mambascope.models import create_model, list_models
from mambascope.models.patch.layers import PatchMerging2D, channel_shuffle
from mambascope.models.patch.microscopic_mamba import ChunkedVSSM, conv_branch
from patch_helpers import one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

TINY_MM = {"dims": (16, 32), "depths": (1, 1), "d_state": 4, "drop_path_rate": 0.0}
TINY_HM = {"dims": (8, 16), "depths": (1, 2), "d_state": 4, "expand": 1, "drop_path_rate": 0.0}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_all_sizes_are_registered():
    names = set(list_models())
    assert {"histomamba-small", "histomamba-base", "histomamba-deep", "microscopic-mamba-tiny",
            "microscopic-mamba-small", "microscopic-mamba-base"} <= names


def test_microscopic_mamba_sizes_match_the_paper():
    tiny = n_params(create_model("microscopic-mamba-tiny", num_classes=1000))
    small = n_params(create_model("microscopic-mamba-small", num_classes=1000))
    base = n_params(create_model("microscopic-mamba-base", num_classes=1000))
    assert 4.15e6 < tiny < 4.45e6  # "about 4.3M" with the 1000-class head
    assert tiny < small < base
    head = 768 * 1000 + 1000
    assert n_params(create_model("microscopic-mamba-tiny", num_classes=2)) == tiny - head + 768 * 2 + 2


def test_histomamba_sizes_grow_from_small_to_deep():
    sizes = [n_params(create_model(f"histomamba-{v}", num_classes=3)) for v in ("small", "base", "deep")]
    assert sizes[0] < sizes[1] < sizes[2]


def _all_parameters_get_gradients(model: torch.nn.Module, loss: torch.Tensor) -> None:
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_microscopic_mamba_uses_every_parameter():
    torch.manual_seed(0)
    model = create_model("microscopic-mamba-tiny", num_classes=3, **TINY_MM).train()
    images = torch.randn(4, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    _all_parameters_get_gradients(model, torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])))


def test_histomamba_uses_every_parameter_with_reconstruction():
    torch.manual_seed(0)
    model = create_model("histomamba-small", num_classes=2, **TINY_HM).train()
    images = torch.randn(3, 3, 32, 32)
    logits, reconstruction = model(images, return_reconstruction=True)
    assert logits.shape == (3, 2) and reconstruction.shape == images.shape
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0]))
    _all_parameters_get_gradients(model, loss + 0.05 * torch.nn.functional.mse_loss(reconstruction, images))


def test_models_take_odd_sizes_and_are_deterministic_in_eval():
    torch.manual_seed(0)
    mm = create_model("microscopic-mamba-tiny", num_classes=2, **TINY_MM).eval()
    hm = create_model("histomamba-small", num_classes=2, **TINY_HM).eval()
    images = torch.randn(2, 3, 36, 30)
    with torch.no_grad():
        assert mm(images).shape == (2, 2)
        logits, reconstruction = hm(images, return_reconstruction=True)
        assert reconstruction.shape == images.shape
        torch.testing.assert_close(hm(images), logits)
        # each image is classified on its own: batch composition does not change the result
        torch.testing.assert_close(mm(images[:1]), mm(images)[:1], rtol=1e-4, atol=1e-5)


def test_vssm_branch_sees_the_whole_image_and_the_conv_branch_does_not():
    torch.manual_seed(0)
    branch = ChunkedVSSM(16, d_state=4).eval()
    assert sum(isinstance(m, type(branch.ss2d)) for m in branch.modules()) == 1  # one SS2D, shared
    x = torch.randn(1, 6, 6, 16, requires_grad=True)
    branch(x)[0, 0, 0].sum().backward()
    reach = x.grad[0].abs().sum(-1)
    assert (reach > 0).all()  # the top-left output depends on every pixel, the far corner included
    local = conv_branch(16).eval()
    y = torch.randn(1, 16, 6, 6, requires_grad=True)
    local(y)[0, :, 0, 0].sum().backward()
    reach = y.grad[0].abs().sum(0)
    assert (reach[:3, :3] > 0).all() and (reach[3:] == 0).all() and (reach[:, 3:] == 0).all()


def test_layers_shuffle_and_merge_as_documented():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    merge = PatchMerging2D(4)
    assert merge(torch.randn(2, 5, 7, 4)).shape == (2, 3, 4, 8)


def test_bad_configurations_are_config_errors():
    with pytest.raises(ConfigError, match="multiples of 16"):
        create_model("microscopic-mamba-tiny", num_classes=2, dims=(24, 48), depths=(1, 1))
    with pytest.raises(ConfigError, match="same length"):
        create_model("histomamba-base", num_classes=2, depths=(1, 1))
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("histomamba-small", num_classes=0)
