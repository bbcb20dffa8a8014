"""The coordinates HDF5 file: one per slide, dataset `coords` (N, 2) int64 level-0 top-left x, y.

Attributes sit on the `coords` dataset, where CLAM (`patch_level`, `patch_size`) and TRIDENT
(`patch_size_level0`, `target_magnification`, ...) readers look for them; file-level attributes of
other tools' files are read too.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mambascope.atomic import atomic_path
from mambascope.errors import DataError
from mambascope.hdf5_attrs import decode_attr, encode_attr

COORDS_KEY = "coords"
#: the attributes mambascope writes; `read_coords` returns each (None where a file lacks it)
STANDARD_ATTRS = ("patch_size", "patch_size_level0", "patch_level", "target_magnification", "target_mpp",
                  "level0_mpp", "level0_magnification", "level0_width", "level0_height", "overlap", "reader",
                  "slide_fingerprint", "mambascope_version")


def coords_path(out_dir: str | Path, slide_id: str) -> Path:
    """`<out>/coords/<slide_id>.h5`."""
    return Path(out_dir) / "coords" / f"{slide_id}.h5"


def _check_coords(coords: np.ndarray, path: Path) -> np.ndarray:
    array = np.asarray(coords)
    if array.ndim != 2 or array.shape[1] != 2:
        raise DataError(f"coords must have shape (N, 2), got {array.shape}", path=path)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"coords must be integer level-0 pixels, got {array.dtype}", path=path)
    return array.astype(np.int64, copy=False)


def write_coords(path: str | Path, coords: np.ndarray, attrs: Mapping[str, Any]) -> Path:
    """Write coordinates and their attributes atomically (None-valued attributes are left out)."""
    import h5py

    path = Path(path)
    array = _check_coords(coords, path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        dataset = handle.create_dataset(COORDS_KEY, data=array, maxshape=(None, 2))
        for key, value in attrs.items():
            if value is not None:
                dataset.attrs[key] = encode_attr(value)
    return path


def read_coords(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Coordinates (N, 2) int64 and attributes (standard keys always present); DataError if broken."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DataError("coordinates file not found", path=path, hint="run `mambascope tile` first")
    try:
        with h5py.File(path, "r") as handle:
            if COORDS_KEY not in handle:
                raise DataError(f"no `{COORDS_KEY}` dataset in HDF5 file (keys: {', '.join(handle) or 'none'})",
                                path=path, hint="pass a coordinates file written by mambascope, CLAM or TRIDENT")
            dataset = handle[COORDS_KEY]
            coords = _check_coords(dataset[()], path)
            attrs = {key: None for key in STANDARD_ATTRS}
            attrs.update({k: decode_attr(k, v) for k, v in handle.attrs.items()})
            attrs.update({k: decode_attr(k, v) for k, v in dataset.attrs.items()})
    except OSError as exc:
        raise DataError(f"cannot read coordinates HDF5 ({exc})", path=path,
                        hint="the file is broken or incomplete; delete it and run `mambascope tile` again") from exc
    return coords, attrs
