"""MIL training on feature files made from the bundled real slides (SVS via OpenSlide, OME-TIFF via tifffile).

Patches of 128 px are cut from the real images (background skipped), embedded by a fixed random-weight
convolution, and written as feature files with their real level-0 coordinates. Each image is split
into blocks that act as slides; the task is H&E (CMU-1, OS-1) against Ki67 IHC (OS-2 crops).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mambascope.cli.main import main
from mambascope.features.store import read_features, write_features
from mambascope.sample_data import sample_path
from mil_helpers import single_thread  # noqa: F401  (autouse fixture)

PATCH = 128
IMAGES = {  # name -> (stain class, blocks per side)
    "CMU-1-Small-Region.svs": ("HE", 3),
    "OS-1-detail.ome.tif": ("HE", 2),
    "OS-2-ndpi.ome.tif": ("IHC", 3),
    "OS-2-vsi.ome.tif": ("IHC", 2),
}


def _read_rgb(name: str) -> tuple[np.ndarray, float | None]:
    path = sample_path(name)
    if path.suffix == ".svs":
        import openslide

        with openslide.OpenSlide(str(path)) as slide:
            rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
            return rgb, float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
    import tifffile

    with tifffile.TiffFile(path) as tif:
        array = tif.series[0].levels[0].asarray()
        axes = tif.series[0].axes
    array = np.squeeze(array)
    if array.ndim == 3 and array.shape[0] in (3, 4) and "S" not in axes[-1:]:
        array = np.moveaxis(array, 0, -1)
    return np.ascontiguousarray(array[..., :3]).astype(np.uint8), None


def _tissue_patches(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-background 128-px patches and their top-left (x, y)."""
    height, width = rgb.shape[:2]
    patches, coords = [], []
    for y in range(0, height - PATCH + 1, PATCH):
        for x in range(0, width - PATCH + 1, PATCH):
            patch = rgb[y : y + PATCH, x : x + PATCH]
            if patch.mean() < 215 or patch.std() > 25:  # skip blank glass
                patches.append(patch)
                coords.append((x, y))
    return np.stack(patches), np.asarray(coords, dtype=np.int64)


def _embed(patches: np.ndarray) -> np.ndarray:
    """A cheap fixed embedding: a seeded random conv layer, mean and std pooled (32-d)."""
    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, 5, stride=4)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.2)
        conv.bias.zero_()
        x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255.0
        x = torch.nn.functional.avg_pool2d(x, 2)
        h = torch.relu(conv(x))
        return torch.cat([h.mean((2, 3)), h.std((2, 3))], dim=1).numpy().astype(np.float32)


@pytest.fixture(scope="module")
def real_bags(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_mil")
    features_dir = root / "features"
    rows = []
    for name, (stain, blocks) in IMAGES.items():
        rgb, mpp = _read_rgb(name)
        patches, coords = _tissue_patches(rgb)
        features = _embed(patches)
        height, width = rgb.shape[:2]
        block = (coords[:, 0] * blocks // width) + blocks * (coords[:, 1] * blocks // height)
        stem = name.split(".")[0]
        for b in np.unique(block):
            keep = block == b
            slide_id = f"{stem}_b{b}"
            write_features(features_dir / f"{slide_id}.h5", features[keep], coords[keep],
                           {"patch_size": PATCH, "patch_size_level0": PATCH, "level0_mpp": mpp or 0.0,
                            "level0_width": width, "level0_height": height},
                           {"encoder": "random-conv-test", "weights": "seed0", "precision": "float32",
                            "transform": "avgpool2"})
            rows.append({"slide_id": slide_id, "label": stain, "case_id": stem, "n": int(keep.sum())})
    frame = pd.DataFrame(rows)
    frame["split"] = [("train", "train", "val", "test")[i % 4] for i in range(len(frame))]
    frame.drop(columns="n").to_csv(root / "labels.csv", index=False)
    return root, features_dir, frame


def test_real_feature_files_hold_real_patches(real_bags):
    _, features_dir, frame = real_bags
    assert 500 <= frame["n"].sum() <= 1200
    assert set(frame["label"]) == {"HE", "IHC"}
    bag = read_features(features_dir / "CMU-1-Small-Region_b4.h5")
    assert bag.features.shape[1] == 32 and bag.coords.shape == (len(bag), 2)
    assert np.all(bag.coords % PATCH == 0)  # real level-0 positions on the 128-px lattice
    assert bag.coords_attrs["level0_mpp"] == pytest.approx(0.499, abs=1e-3)


@pytest.mark.parametrize("model", ["abmil-gated", "mamba2d"])
def test_train_and_evaluate_on_real_features(real_bags, tmp_path, model):
    root, features_dir, _ = real_bags
    args = {"abmil-gated": "{hidden_dim: 32, attn_dim: 16, dropout: 0.0}",
            "mamba2d": "{dim: 16, depth: 1, d_state: 4, attn_dim: 16, dropout: 0.0, cuda_graphs: 4}"}[model]
    run = tmp_path / "run"
    assert main(["train", "mil", "--features", str(features_dir), "--labels", str(root / "labels.csv"),
                 "--model", model, "--model-args", args, "--out", str(run), "--epochs", "8", "--lr", "3e-3",
                 "--accelerator", "cpu", "--devices", "1", "--patience", "0", "--max-patches", "64",
                 "--no-progress-bar"]) == 0
    metrics = json.loads((run / "metrics" / "final_metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] == 6
    assert metrics["accuracy"] >= 5 / 6  # H&E vs DAB-stained IHC separates by colour
