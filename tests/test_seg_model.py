"""SegMamba: forward/backward on the real case, any input size, tri-orientated scans, checkpointing."""

from __future__ import annotations

import itertools

import pytest
import torch

from mambascope.data.brats import brats_transforms, find_cases
from mambascope.models import create_model
from mambascope.models.seg.encoder import TriOrientedMamba
from mambascope.ssm import Mamba, tri_orientation_orders
from seg_helpers import write_dataset

#: the smallest SegMamba that still has every part (4 stages, GSC, ToM, UNETR decoder)
TINY = {"in_channels": 4, "out_channels": 3, "base_channels": 4, "depths": (1, 1, 1, 1), "d_state": 4,
        "expand": 1, "hidden_channels": 16}


def test_forward_backward_on_real_patches(tmp_path):
    torch.manual_seed(0)
    case = find_cases(write_dataset(tmp_path, n_cases=1), require_label=True)[0]
    samples = brats_transforms("train", patch_size=(32, 32, 32), num_samples=2)(case.as_record())
    image = torch.stack([s["image"].as_tensor() for s in samples])
    label = torch.stack([s["label"].as_tensor() for s in samples])
    model = create_model("segmamba", **{**TINY, "base_channels": 8, "hidden_channels": 32})
    logits = model(image)
    assert logits.shape == (2, 3, 32, 32, 32)
    from mambascope.train.seg import DiceBCELoss

    loss = DiceBCELoss()(logits, label)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name in ("stages.0.down.weight", "stages.0.mamba.0.mixers.2.in_proj.weight", "stages.3.gsc.gate.conv.weight",
                 "up_blocks.3.transp_conv.conv.weight", "head.1.conv.conv.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("size", [(64, 64, 64), (96, 96, 96), (128, 128, 128), (40, 56, 24)])
def test_forward_at_any_size(size):
    torch.manual_seed(0)
    model = create_model("segmamba", **TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, *size))
    assert out.shape == (1, 3, *size)
    assert torch.isfinite(out).all()


def test_default_model_matches_the_paper_widths():
    model = create_model("segmamba")
    widths = [stage.gsc.gate.conv.out_channels for stage in model.stages]
    assert widths == [48, 96, 192, 384]
    assert model.skip_blocks[4].layer.conv1.conv.out_channels == 768
    assert [len(stage.mamba) for stage in model.stages] == [2, 2, 2, 2]


def test_tri_orientation_reaches_every_voxel():
    """Each order is causal; together forward, reverse and inter-slice let one voxel see the whole volume."""
    torch.manual_seed(0)
    layer = TriOrientedMamba(channels=4, d_state=4, expand=1)
    x = torch.randn(1, 4, 3, 4, 5, requires_grad=True)

    def reach() -> torch.Tensor:
        """Which input voxels the output at (d=2, h=0, w=0) depends on."""
        x.grad = None
        layer(x)[0, :, 2, 0, 0].sum().backward()
        return x.grad.abs().sum(1)[0] > 0

    assert reach().all()
    layer.mixers[0].out_proj.weight.data.zero_()  # without the forward scan:
    seen = reach()
    assert seen[2].all()  # the reverse scan still covers the rest of slice 2
    assert seen[0, 0, 0] and seen[1, 0, 0]  # the inter-slice scan reaches the same (h, w) in earlier slices
    assert seen.sum() == 4 * 5 + 2  # and nothing else


def test_tri_orientation_is_the_three_orders_as_token_permutations():
    """The layer walks in place (reverse scan, transposed tokens); that must be causal mixers run on the
    tokens gathered in each order of `tri_orientation_orders` and scattered back."""
    torch.manual_seed(0)
    layer = TriOrientedMamba(channels=4, d_state=4, expand=1).eval()
    causal = [Mamba(4, d_state=4, expand=1).eval() for _ in range(3)]
    for mixer, twin in zip(layer.mixers, causal, strict=True):
        twin.load_state_dict(mixer.state_dict())
    x = torch.randn(2, 4, 3, 4, 5)
    tokens = x.flatten(2).transpose(1, 2)
    normed = layer.norm(tokens)
    mixed = sum(twin(normed[:, perm])[:, inverse]
                for twin, (perm, inverse) in zip(causal, tri_orientation_orders(3, 4, 5), strict=True))
    want = (tokens + mixed / 3).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(layer(x), want)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = create_model("segmamba", **TINY)
    checkpointed = create_model("segmamba", **TINY, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 4, 32, 32, 32)  # 2³ tokens at the bottleneck: instance norm needs more than one
    grads = []
    for model in (plain, checkpointed):
        model.train()
        model(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_overfits_one_real_batch(tmp_path):
    """Learning signal: a few AdamW steps on one batch of real patches lower the Dice + BCE loss."""
    from monai.utils import set_determinism

    from mambascope.train.seg import DiceBCELoss

    torch.manual_seed(0)
    set_determinism(seed=0)
    case = find_cases(write_dataset(tmp_path, n_cases=1), require_label=True)[0]
    samples = brats_transforms("train", patch_size=(32, 32, 32), num_samples=2, pos_fraction=1.0)(case.as_record())
    image = torch.stack([s["image"].as_tensor() for s in samples])
    label = torch.stack([s["label"].as_tensor() for s in samples])
    model = create_model("segmamba", **TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = DiceBCELoss()
    losses = []
    for _ in range(6):
        loss = loss_fn(model(image), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in itertools.pairwise(losses)), losses  # every step helps
    assert losses[-1] < 0.95 * losses[0], losses
