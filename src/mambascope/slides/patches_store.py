"""The patch-pixels HDF5 file (HistoMamba layout): `<out>/<slide_id>/patches/<slide_id>_patches.h5`.

Dataset `data` (N, H, W, 3) uint8 chunked one patch per chunk (random access for training), plus
`coords` (N, 2) int64 with the same attributes as the coordinates file.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mambascope.atomic import atomic_path
from mambascope.slides.coords_store import COORDS_KEY
from mambascope.slides.reader import Slide

DATA_KEY = "data"
_WRITE_BATCH = 64  # patches buffered per HDF5 write
_READ_THREADS = 2


def patches_path(out_dir: str | Path, slide_id: str) -> Path:
    """`<out>/<slide_id>/patches/<slide_id>_patches.h5`."""
    return Path(out_dir) / slide_id / "patches" / f"{slide_id}_patches.h5"


def write_patches(path: str | Path, slide: Slide, coords: np.ndarray, patch_size: int, patch_size_level0: int,
                  attrs: Mapping[str, Any]) -> Path:
    """Read every patch (best level, resized to `patch_size`) and write them with their coordinates, atomically."""
    import h5py

    coords = np.asarray(coords, dtype=np.int64)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        data = handle.create_dataset(DATA_KEY, shape=(len(coords), patch_size, patch_size, 3), dtype=np.uint8,
                                     chunks=(1, patch_size, patch_size, 3))
        def read(corner: np.ndarray) -> np.ndarray:
            return slide.read_patch((int(corner[0]), int(corner[1])), patch_size_level0, patch_size)

        # the slide libraries decode outside the GIL, so a few threads keep the cores busy on one slide
        with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
            for start in range(0, len(coords), _WRITE_BATCH):
                batch = coords[start:start + _WRITE_BATCH]
                data[start:start + len(batch)] = np.stack(list(pool.map(read, batch)))
        dataset = handle.create_dataset(COORDS_KEY, data=coords)
        for key, value in attrs.items():
            if value is not None:
                dataset.attrs[key] = value
                data.attrs[key] = value
    return Path(path)


def patches_complete(path: str | Path, num_patches: int, patch_size: int) -> bool:
    """Whether a patches file opens and holds `num_patches` patches of `patch_size` with their coordinates."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return (handle[DATA_KEY].shape == (num_patches, patch_size, patch_size, 3)
                    and handle[COORDS_KEY].shape == (num_patches, 2))
    except (OSError, KeyError):
        return False
