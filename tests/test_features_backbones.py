"""Backbone registry: dimensions, weight loading from local files, refusing wrong files, no downloads."""

from __future__ import annotations

import pytest
import timm
import torch

from mambascope.errors import CheckpointError, ConfigError
from mambascope.features import backbones
from mambascope.features.backbones import create_backbone


@pytest.mark.parametrize(("name", "dim", "interpolation"), [
    ("resnet50-trunc", 1024, "bilinear"), ("resnet50", 2048, "bilinear"), ("resnet34", 512, "bilinear"),
    ("vit_b16", 768, "bicubic"),
])
def test_registered_backbones_have_their_documented_width(name, dim, interpolation):
    with pytest.warns(UserWarning, match="random weights"):
        backbone = create_backbone(name, "none")
    assert backbone.feature_dim == dim and backbone.input_size == 224
    assert backbone.interpolation == interpolation and backbone.weights == "none" and backbone.init_seed == 0
    assert not backbone.module.training


def test_resnet50_trunc_is_layer3_average_pool_of_a_full_resnet50_file(tmp_path):
    torch.manual_seed(1)
    full = timm.create_model("resnet50", num_classes=1000).eval()
    weights = tmp_path / "resnet50_full.pth"
    torch.save(full.state_dict(), weights)  # includes layer4 and fc, which the truncated encoder drops
    backbone = create_backbone("resnet50-trunc", weights)
    assert backbone.weights.startswith("file:resnet50_full.pth sha256:")
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        h = full.maxpool(full.act1(full.bn1(full.conv1(x))))
        expected = full.layer3(full.layer2(full.layer1(h))).mean(dim=(2, 3))
        got = backbone.module(x)
    assert got.shape == (2, 1024)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_wrapped_checkpoint_with_prefixes_loads(tmp_path):
    torch.manual_seed(2)
    source = timm.create_model("test_vit", num_classes=0)
    path = tmp_path / "lightning_style.ckpt"
    torch.save({"state_dict": {f"module.encoder.{k}": v for k, v in source.state_dict().items()}}, path)
    backbone = create_backbone("timm:test_vit", path)
    for key, value in source.state_dict().items():
        assert torch.equal(backbone.module.state_dict()[key], value)


def test_weights_for_another_architecture_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "resnet18_weights.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)  # same layer shapes, fewer blocks
    with pytest.raises(CheckpointError, match="does not fit backbone resnet34") as info:
        create_backbone("resnet34", path)
    assert "resnet18_weights.pth" in str(info.value) and "missing 96" in str(info.value)
    vit = tmp_path / "vit_weights.pth"
    torch.save(timm.create_model("test_vit").state_dict(), vit)
    with pytest.raises(CheckpointError, match=r"wrong shape|unexpected") as info:
        create_backbone("timm:test_resnet", vit)
    assert "vit_weights.pth" in str(info.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read weights file"):
        create_backbone("resnet34", junk)


def test_unknown_names_and_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown backbone"):
        create_backbone("resnet51", "none")
    with pytest.raises(ConfigError, match="timm has no model"):
        create_backbone("timm:no_such_model_xyz", "none")
    with pytest.raises(ConfigError, match="neither `imagenet`, `none` nor an existing file"):
        create_backbone("resnet34", tmp_path / "missing.pth")


def test_imagenet_weights_error_clearly_when_the_download_fails(monkeypatch):
    real_create = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(CheckpointError, match="needs a network") as info:
        create_backbone("resnet34", "imagenet")
    assert "resnet34.tv_in1k" in str(info.value)


def test_random_init_is_seeded_so_every_process_agrees():
    with pytest.warns(UserWarning):
        a, b, c = (create_backbone("timm:test_vit", "none", seed=s) for s in (0, 0, 1))
    first = next(iter(a.module.state_dict()))
    assert torch.equal(a.module.state_dict()[first], b.module.state_dict()[first])
    assert not torch.equal(a.module.state_dict()[first], c.module.state_dict()[first])
    assert backbones.resolve_spec("timm:test_vit").timm_name == "test_vit"
