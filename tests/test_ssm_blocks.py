"""Mamba blocks: initialisation, causality, backends agree, masks on a real slide's patch grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from torch import nn

from mambascope.sample_data import sample_path
from mambascope.ssm import SS2D, Mamba, Mamba2D, VSSBlock, cross_merge, cross_scan, selective_scan


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def with_backend(module: nn.Module, backend: str) -> nn.Module:
    for sub in module.modules():
        if hasattr(sub, "backend"):
            sub.backend = backend
    return module


def test_mamba_initialisation_follows_mamba1():
    block = Mamba(40, d_state=8)
    assert block.d_inner == 80 and block.dt_rank == math.ceil(40 / 16)
    assert block.conv1d.kernel_size == (4,) and block.conv1d.groups == 80
    dt = F.softplus(block.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert dt.max() / dt.min() > 10  # log-uniform spread, not a constant
    A = -torch.exp(block.A_log)
    torch.testing.assert_close(A, -torch.arange(1, 9, dtype=torch.float32).expand(80, 8))
    assert torch.equal(block.D, torch.ones(80))
    assert block.A_log._no_weight_decay


def test_mamba_is_causal_and_bidirectional_is_not():
    x = torch.randn(2, 30, 16)
    later = x.clone()
    later[:, 20:] += torch.randn(2, 10, 16)
    causal = Mamba(16).eval()
    torch.testing.assert_close(causal(later)[:, :20], causal(x)[:, :20])
    assert not torch.allclose(causal(later)[:, 20:], causal(x)[:, 20:])
    both = Mamba(16, bidirectional=True).eval()
    assert not torch.allclose(both(later)[:, :20], both(x)[:, :20])
    assert {"conv1d_b.weight", "A_b_log", "D_b", "x_proj_b.weight", "dt_proj_b.bias"} <= set(both.state_dict())


def test_bidirectional_sums_forward_scan_and_flipped_reverse_scan():
    """The reverse path walks from the end in place (a look-ahead conv, `reverse=True` scan); it must be
    the causal path run on the flipped sequence and flipped back, as Vim defines it."""
    block = Mamba(8, bidirectional=True).eval()
    x = torch.randn(1, 12, 8)
    xs, z = block.in_proj(x).transpose(1, 2).chunk(2, dim=1)
    forward = block._scan_path(xs, z, block.conv1d, block.x_proj, block.dt_proj, block.A_log, block.D, False)
    flipped = block._scan_path(xs.flip(-1), z.flip(-1), block.conv1d_b, block.x_proj_b, block.dt_proj_b,
                               block.A_b_log, block.D_b, False).flip(-1)
    in_place = block._scan_path(xs, z, block.conv1d_b, block.x_proj_b, block.dt_proj_b, block.A_b_log, block.D_b,
                                True)
    torch.testing.assert_close(in_place, flipped)
    torch.testing.assert_close(block(x), block.out_proj((forward + flipped).transpose(1, 2)))
    assert not torch.allclose(flipped, forward)


def test_reverse_mamba_is_the_flipped_causal_mamba():
    causal = Mamba(16).eval()
    reverse = Mamba(16, reverse=True).eval()
    reverse.load_state_dict(causal.state_dict())
    x = torch.randn(2, 30, 16)
    torch.testing.assert_close(reverse(x), causal(x.flip(1)).flip(1))
    earlier = x.clone()
    earlier[:, :10] += torch.randn(2, 10, 16)
    torch.testing.assert_close(reverse(earlier)[:, 10:], reverse(x)[:, 10:])  # looks only ahead
    assert not torch.allclose(reverse(earlier)[:, :10], reverse(x)[:, :10])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_mamba_backends_agree_and_gradients_reach_every_parameter(bidirectional):
    block = Mamba(16, d_state=4, bidirectional=bidirectional)
    x = torch.randn(2, 23, 16)
    out = with_backend(block, "torch")(x)
    torch.testing.assert_close(out, with_backend(block, "reference")(x), rtol=1e-4, atol=1e-5)
    with_backend(block, "torch")(x).square().mean().backward()
    for name, param in block.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_ss2d_shapes_backends_and_grouped_directions():
    block = SS2D(12, d_state=4)
    assert block.d_inner == 24
    assert block.x_proj_weight.shape == (4, 1 + 8, 24) and block.A_logs.shape == (96, 4)
    x = torch.randn(2, 5, 7, 12)
    out = with_backend(block, "torch")(x)
    assert out.shape == (2, 5, 7, 12)
    torch.testing.assert_close(out, with_backend(block, "reference")(x), rtol=1e-4, atol=1e-5)


def test_ss2d_scan_is_the_four_walks_of_cross_scan_merged():
    """The block scans rows and columns from both ends in place; on a non-square grid that must equal
    the four copies `cross_scan` makes, scanned as one grouped scan and summed back by `cross_merge`."""
    block = SS2D(6, d_state=4)
    batch, d, H, W = 2, block.d_inner, 5, 7
    x = torch.randn(batch, d, H, W)
    xs = cross_scan(x)
    proj = torch.einsum("bkdl,kcd->bkcl", xs, block.x_proj_weight)
    dts, Bs, Cs = proj.split([block.dt_rank, block.d_state, block.d_state], dim=2)
    dts = torch.einsum("bkrl,kdr->bkdl", dts, block.dt_projs_weight)
    y = selective_scan(xs.reshape(batch, 4 * d, H * W), dts.reshape(batch, 4 * d, H * W),
                       -torch.exp(block.A_logs), Bs, Cs, block.Ds, delta_bias=block.dt_projs_bias.reshape(-1),
                       delta_softplus=True, backend="reference")
    want = cross_merge(y.view(batch, 4, d, H * W), H, W)
    torch.testing.assert_close(with_backend(block, "torch").scan(x), want.float(), rtol=1e-4, atol=1e-5)


def test_ss2d_sees_the_whole_image():
    """Four walks: a change in the bottom-right pixel reaches the top-left output (and vice versa)."""
    block = SS2D(8, d_state=4).eval()
    x = torch.randn(1, 6, 6, 8)
    changed = x.clone()
    changed[0, 5, 5] += 5
    assert not torch.allclose(block(changed)[0, 0, 0], block(x)[0, 0, 0])


def test_ss2d_out_proj_hook_receives_gated_merged_scan():
    seen = {}

    class Recorder(nn.Module):
        def forward(self, y):
            seen["shape"] = tuple(y.shape)
            return y[..., :10] * 2

    block = SS2D(10, d_state=4, out_proj=Recorder())
    x = torch.randn(2, 3, 4, 10)
    out = block(x)
    assert seen["shape"] == (2, 3, 4, 20) and out.shape == (2, 3, 4, 10)
    assert isinstance(block.out_norm, nn.Identity)
    xs, z = block.in_proj(x).chunk(2, dim=-1)
    conv = F.silu(block.conv2d(xs.permute(0, 3, 1, 2)))
    merged = block.scan(conv).transpose(1, 2).reshape(2, 3, 4, 20)
    torch.testing.assert_close(out, (merged * F.silu(z))[..., :10] * 2)


def test_vss_block_is_residual_and_mlp_optional():
    block = VSSBlock(8, d_state=4, mlp_ratio=2.0, drop_path=0.2).eval()
    x = torch.randn(1, 4, 5, 8)
    with torch.no_grad():
        block.op.out_proj.weight.zero_()
        block.mlp.fc2.weight.zero_()
        block.mlp.fc2.bias.zero_()
    torch.testing.assert_close(block(x), x)  # both branches silenced: identity
    assert not hasattr(VSSBlock(8, mlp_ratio=0.0), "mlp")


def slide_patch_grid(patch: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean/std colour features of the bundled CMU-1 slide region and a tissue mask."""
    image = tifffile.imread(sample_path("CMU-1-Small-Region.svs")).astype(np.float32) / 255
    H, W = image.shape[0] // patch, image.shape[1] // patch
    tiles = image[: H * patch, : W * patch].reshape(H, patch, W, patch, 3)
    feats = np.concatenate([tiles.mean(axis=(1, 3)), tiles.std(axis=(1, 3))], axis=-1)
    tissue = tiles.mean(axis=(1, 3, 4)) < 215 / 255
    return torch.from_numpy(feats)[None], torch.from_numpy(tissue)[None]


def test_mamba2d_on_real_slide_grid_ignores_background_content():
    feats, tissue = slide_patch_grid()
    assert 0.2 < tissue.float().mean() < 0.8  # the region has both tissue and glass
    block = Mamba2D(6, d_state=4, expand=2).eval()
    out = block(feats, tissue)
    assert out.shape == feats.shape
    assert (out[~tissue] == 0).all() and out[tissue].abs().sum() > 0
    scrambled = torch.where(tissue[..., None], feats, torch.rand_like(feats) * 5)
    torch.testing.assert_close(block(scrambled, tissue)[tissue], out[tissue], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(with_backend(block, "reference")(feats, tissue), out, rtol=1e-4, atol=1e-5)


def test_mamba2d_without_mask_and_gradients():
    block = Mamba2D(8, d_state=4)
    x = torch.randn(2, 3, 5, 8)
    out = block(x)
    assert out.shape == (2, 3, 5, 8)
    out.square().mean().backward()
    assert all(p.grad is not None for p in block.parameters())


def test_channel_product_matches_matmul_and_keeps_each_grid_of_a_batch_its_own():
    from mambascope.ssm.blocks import channel_product

    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 11, 5, generator=gen, dtype=torch.float64).transpose(1, 2)  # channel-first view
    out = channel_product(weight, x)
    assert out.is_contiguous() and out.shape == (3, 7, 11)
    torch.testing.assert_close(out, weight @ x)
    block = Mamba2D(8, d_state=4).double()
    grids = torch.randn(2, 3, 5, 8, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 3, 5, generator=gen) < 0.7
    together = block(grids, mask)
    for i in range(2):
        torch.testing.assert_close(together[i : i + 1], block(grids[i : i + 1], mask[i : i + 1]))


def test_mamba_learns_to_recall_the_first_token():
    """Learning signal: the answer sits at position 0 and is read out at the last position, so the
    selective state has to carry it through 7 distractors."""
    gen = torch.Generator().manual_seed(0)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, 2, (n, 8), generator=gen)
        return F.one_hot(tokens, 2).float(), tokens[:, 0]

    embed, mixer, head = nn.Linear(2, 32), Mamba(32, d_state=8), nn.Linear(32, 2)
    params = [*embed.parameters(), *mixer.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(100):
        x, y = batch(64)
        loss = F.cross_entropy(head(mixer(embed(x))[:, -1]), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, y = batch(512)
    with torch.no_grad():
        accuracy = (head(mixer(embed(x))[:, -1]).argmax(-1) == y).float().mean()
    assert accuracy > 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused conv runs on a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["2d", "1d", "1d_reverse"])
def test_conv_before_the_scan_on_a_gpu_is_fused_and_matches_pytorch(dtype, kind):
    """On CUDA tensors the depthwise conv + SiLU in front of the scans (Mamba2D's "same" 3×3, Mamba's
    causal conv of width 4 and its look-ahead mirror) is one Triton kernel each way; its output and
    gradients are PyTorch's conv and SiLU (float64) within rounding, over several tiles."""
    from mambascope.ssm.dispatch import depthwise_conv_silu

    if kind == "2d":
        conv = nn.Conv2d(24, 24, 3, padding="same", groups=24).cuda()
        x = torch.randn(2, 24, 45, 131, device="cuda")
    else:
        conv = nn.Conv1d(24, 24, 4, padding=3, groups=24).cuda()
        x = torch.randn(2, 24, 1500, device="cuda")
    x = x.to(dtype).requires_grad_()
    dy = torch.randn(x.shape, device="cuda").to(dtype)
    reverse = kind == "1d_reverse"
    fused = depthwise_conv_silu(conv, x, reverse=reverse)
    assert fused.grad_fn is not None and "DepthwiseConvSiLU" in type(fused.grad_fn).__name__
    grads = torch.autograd.grad(fused, (x, conv.weight, conv.bias), dy)
    wide = conv.double()
    x64 = x.detach().double().requires_grad_()
    if kind == "2d":
        ref = F.silu(wide(x64))
    else:  # Mamba's causal conv; a walk from the end is the causal conv of the flipped sequence, flipped back
        seq = x64.flip(-1) if reverse else x64
        ref = F.silu(wide(seq)[..., : x.shape[-1]])
        ref = ref.flip(-1) if reverse else ref
    expected = torch.autograd.grad(ref, (x64, wide.weight, wide.bias), dy.double())
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in zip((fused, *grads), (ref, *expected), strict=True):
        assert ((got.double() - want).norm() / want.norm()).item() < tolerance
