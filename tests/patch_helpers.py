"""Small real datasets for the patch-classifier tests: H&E vs Ki67 IHC patches from the bundled crops.

H&E: OS-1 (OME-TIFF) and CMU-1-Small-Region (Aperio SVS); IHC: OS-2 as NDPI and VSI exports. Each
image is halved, split into four quadrants (one *sample* each) and cut into 32x32 tissue patches, so
samples held out for validation/testing are image regions the model never saw.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from mambascope.sample_data import sample_path

SOURCES = {
    "HE": ("OS-1-detail.ome.tif", "CMU-1-Small-Region.svs"),
    "IHC": ("OS-2-ndpi.ome.tif", "OS-2-vsi.ome.tif"),
}
PATCH = 32


def _tiles(image: np.ndarray, size: int) -> np.ndarray:
    rows, cols = image.shape[0] // size, image.shape[1] // size
    grid = image[: rows * size, : cols * size].reshape(rows, size, cols, size, 3)
    return grid.swapaxes(1, 2).reshape(-1, size, size, 3)


@functools.lru_cache(maxsize=4)
def real_patch_samples(per_sample: int = 12, size: int = PATCH) -> tuple[tuple[str, str, np.ndarray], ...]:
    """(sample_id, label, patches (n, size, size, 3) uint8) for 4 quadrants of each of the 4 real images."""
    samples = []
    for label, names in SOURCES.items():
        for name in names:
            image = tifffile.imread(sample_path(name))[..., :3]
            image = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA)
            height, width = image.shape[:2]
            stem = name.split(".")[0].replace("-", "")
            for quadrant in range(4):
                r, c = divmod(quadrant, 2)
                tiles = _tiles(image[r * height // 2:(r + 1) * height // 2, c * width // 2:(c + 1) * width // 2],
                               size)
                coverage = (tiles.min(-1) < 200).mean((1, 2))  # fraction of stained (non-white) pixels
                dense = np.sort(np.argsort(-coverage)[:max(per_sample, int((coverage > 0.6).sum()))])
                chosen = dense[np.linspace(0, len(dense) - 1, per_sample).round().astype(int)]
                samples.append((f"{stem}_q{quadrant}", label, np.ascontiguousarray(tiles[chosen])))
    return tuple(samples)


def write_h5_layout(root: Path, per_sample: int = 12, patch_dir_name: str = "patches") -> Path:
    """HistoMamba layout `<root>/<id>/<patch_dir>/<id>_patches.h5` (+ coords) and `root/metadata.csv`."""
    rows = []
    for sample_id, label, patches in real_patch_samples(per_sample):
        folder = root / sample_id / patch_dir_name
        folder.mkdir(parents=True, exist_ok=True)
        with h5py.File(folder / f"{sample_id}_patches.h5", "w") as handle:
            handle.create_dataset("data", data=patches, chunks=(1, *patches.shape[1:]))
            handle.create_dataset("coords", data=np.zeros((len(patches), 2), dtype=np.int64))
        rows.append({"id": sample_id, "tissue_type": label})
    csv = root / "metadata.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def write_image_folder(root: Path, per_sample: int = 12) -> Path:
    """ImageFolder tree: quadrants 0-1 of every image train, quadrant 2 val, quadrant 3 test."""
    splits = {"q0": "train", "q1": "train", "q2": "val", "q3": "test"}
    for sample_id, label, patches in real_patch_samples(per_sample):
        folder = root / splits[sample_id.rsplit("_", 1)[1]] / label
        folder.mkdir(parents=True, exist_ok=True)
        for i, patch in enumerate(patches):
            cv2.imwrite(str(folder / f"{sample_id}_{i:03d}.png"), cv2.cvtColor(patch, cv2.COLOR_RGB2BGR))
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread (and do not fight other test processes for cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
