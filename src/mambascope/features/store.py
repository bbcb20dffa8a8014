"""The features HDF5 format: one file per slide, `<out>/<slide_id>.h5`.

Layout (readable by CLAM- and TRIDENT-style code):

- dataset `features` (N, D) float32 or float16; its attrs hold how the features were made
  (`encoder`, `weights`, `precision`, `transform`, `feature_dim`, `complete`, ...);
- dataset `coords` (N, 2) int64, level-0 top-left x, y, with the coordinates file's attrs;
- optional dataset `zero_filled` (M,) int64: rows whose tile could not be read and were zero-filled.

Files are written to `name.tmp` and renamed when complete, so a file under the final name with
`complete=True` is whole. Besides our own files, :func:`read_features` reads CLAM `.h5` (`features`,
`coords`), TRIDENT `.h5` (attrs on the datasets) and CLAM `.pt` (a tensor (N, D); coords None).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mambascope.atomic import atomic_path
from mambascope.errors import DataError
from mambascope.hdf5_attrs import decode_attr, encode_attr

FEATURE_SUFFIXES = (".h5", ".pt")
_ROWS_PER_CHUNK = 512
#: attrs we store as JSON text and hand back parsed (other tools' string attrs stay strings)
JSON_ATTRS = frozenset({"transform"})


@dataclass
class FeatureBag:
    """All patch features of one slide, with their level-0 coordinates and provenance."""

    features: np.ndarray
    coords: np.ndarray | None
    coords_attrs: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    slide_id: str = ""

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])


def features_path(out_dir: str | Path, slide_id: str) -> Path:
    """Where the features of `slide_id` live under `out_dir`."""
    return Path(out_dir) / f"{slide_id}.h5"


def slide_id_from_path(path: str | Path) -> str:
    """`<out>/<slide_id>.h5` -> slide_id (only the final suffix is removed: ids may contain dots)."""
    path = Path(path)
    return path.name[: -len(path.suffix)] if path.suffix in FEATURE_SUFFIXES else path.name


def _write_attrs(target: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        if value is None:
            continue  # HDF5 has no null; an absent key reads back as absent
        target.attrs[key] = encode_attr(value)


def _read_attrs(target: h5py.HLObject) -> dict[str, Any]:
    return {key: decode_attr(key, value, JSON_ATTRS) for key, value in target.attrs.items()}


class FeatureWriter:
    """Fill one features file in row blocks as batches arrive, so memory does not grow with N.

    Rows may arrive in any order (`write(start, block)`); `finish()` checks every row was written,
    marks the file complete and lets :func:`open_feature_writer` rename it into place.
    """

    def __init__(self, handle: h5py.File, num_rows: int, feature_dim: int, dtype: np.dtype):
        self._handle = handle
        self._features = handle.create_dataset(
            "features", shape=(num_rows, feature_dim), dtype=dtype,
            chunks=(max(1, min(_ROWS_PER_CHUNK, num_rows)), feature_dim) if num_rows else None,
        )
        self._written = np.zeros(num_rows, dtype=bool)
        self._zero_filled: list[int] = []

    def write(self, start: int, block: np.ndarray) -> None:
        """Store rows `start : start + len(block)`."""
        stop = start + block.shape[0]
        self._features[start:stop] = block.astype(self._features.dtype, copy=False)
        self._written[start:stop] = True

    def mark_zero_filled(self, rows: np.ndarray | list[int]) -> None:
        """Record rows whose tile was unreadable and replaced by zeros (kept in dataset `zero_filled`)."""
        self._zero_filled.extend(int(r) for r in rows)

    def finish(self) -> None:
        missing = int((~self._written).sum())
        if missing:
            raise RuntimeError(f"features file closed with {missing} rows never written")
        zero_filled = np.asarray(sorted(set(self._zero_filled)), dtype=np.int64)
        if zero_filled.size:
            self._handle.create_dataset("zero_filled", data=zero_filled)
        self._features.attrs["num_zero_filled"] = int(zero_filled.size)
        self._features.attrs["complete"] = True


@contextmanager
def open_feature_writer(path: str | Path, *, coords: np.ndarray, feature_dim: int, coords_attrs: Mapping[str, Any],
                        attrs: Mapping[str, Any], dtype: str | np.dtype = "float32",
                        slide_id: str | None = None) -> Iterator[FeatureWriter]:
    """Create `path` atomically: coords and attrs first, then features row blocks via the writer.

    The file appears under its final name only if the block exits without error and every row was
    written; otherwise the temporary file is removed.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype("float32"), np.dtype("float16")):
        raise ValueError(f"features dtype must be float32 or float16, not {dtype}")
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        coords_ds = handle.create_dataset("coords", data=coords)
        _write_attrs(coords_ds, coords_attrs)
        writer = FeatureWriter(handle, coords.shape[0], feature_dim, dtype)
        _write_attrs(writer._features, {**attrs, "feature_dim": int(feature_dim),
                                        "slide_id": slide_id or slide_id_from_path(path)})
        yield writer
        writer.finish()


def write_features(path: str | Path, features: np.ndarray, coords: np.ndarray, coords_attrs: Mapping[str, Any],
                   attrs: Mapping[str, Any], slide_id: str | None = None) -> Path:
    """Write a whole features file at once (atomic). `features` (N, D) float32|float16, `coords` (N, 2)."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {features.shape}")
    if np.asarray(coords).reshape(-1, 2).shape[0] != features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {np.asarray(coords).reshape(-1, 2).shape[0]} coords")
    dtype = features.dtype if features.dtype in (np.float16, np.float32) else np.dtype("float32")
    with open_feature_writer(path, coords=coords, feature_dim=features.shape[1], coords_attrs=coords_attrs,
                             attrs=attrs, dtype=dtype, slide_id=slide_id) as writer:
        if features.shape[0]:
            writer.write(0, features)
    return Path(path)


def _squeeze_rows(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Accept (1, N, D) as written by some pipelines; anything but 2-D after that is an error."""
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise DataError(f"{what} must be a 2-D (N, D) array, found shape {array.shape}", path=path,
                        hint="re-extract features with `mambascope features`")
    return array


def _read_pt(path: Path) -> FeatureBag:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"cannot load .pt features file ({type(exc).__name__})", path=path,
                        hint="a CLAM .pt feature file holds one tensor (N, D)") from None
    if isinstance(obj, Mapping) and "features" in obj:
        obj = obj["features"]
    if not isinstance(obj, torch.Tensor):
        raise DataError(f".pt features file holds a {type(obj).__name__}, not a tensor", path=path,
                        hint="a CLAM .pt feature file holds one tensor (N, D)")
    tensor = obj.detach().cpu()
    if tensor.dtype not in (torch.float16, torch.float32):
        tensor = tensor.float()
    features = _squeeze_rows(tensor.numpy(), path, "features")
    return FeatureBag(features=features, coords=None, coords_attrs={}, attrs={"format": "clam-pt"},
                      slide_id=slide_id_from_path(path))


def _open_h5(path: Path) -> h5py.File:
    if not path.is_file():
        raise DataError("features file not found", path=path,
                        hint="run `mambascope features` first or check --features")
    try:
        return h5py.File(path, "r")
    except OSError:
        raise DataError("features file is not a readable HDF5 file (truncated or corrupt?)", path=path,
                        hint="delete it and rerun `mambascope features`") from None


def read_features(path: str | Path) -> FeatureBag:
    """Read our, CLAM or TRIDENT `.h5` features, or a CLAM `.pt` file, into a :class:`FeatureBag`."""
    path = Path(path)
    if path.suffix == ".pt":
        if not path.is_file():
            raise DataError("features file not found", path=path, hint="check --features")
        return _read_pt(path)
    with _open_h5(path) as handle:
        if "features" not in handle:
            raise DataError("HDF5 file has no `features` dataset", path=path,
                            hint="this is not a features file (a coords file? use `mambascope features`)")
        features_ds = handle["features"]
        attrs = {**_read_attrs(handle), **_read_attrs(features_ds)}
        if attrs.get("complete") is False:
            raise DataError("features file is incomplete", path=path, hint="rerun `mambascope features`")
        try:
            features = _squeeze_rows(features_ds[()], path, "features")
            coords = coords_attrs = None
            if "coords" in handle:
                coords_ds = handle["coords"]
                coords = _squeeze_rows(coords_ds[()], path, "coords").astype(np.int64, copy=False)
                coords_attrs = _read_attrs(coords_ds)
            if "zero_filled" in handle:
                attrs["zero_filled"] = handle["zero_filled"][()].astype(np.int64).tolist()
        except OSError:
            raise DataError("features file is damaged (cannot read its datasets)", path=path,
                            hint="delete it and rerun `mambascope features`") from None
    if coords is not None and (coords.shape[1] != 2 or coords.shape[0] != features.shape[0]):
        raise DataError(f"coords shape {coords.shape} does not match {features.shape[0]} feature rows",
                        path=path, hint="features and coords must come from the same extraction")
    slide_id = str(attrs.get("slide_id") or slide_id_from_path(path))
    return FeatureBag(features=features, coords=coords, coords_attrs=coords_attrs or {}, attrs=attrs,
                      slide_id=slide_id)


def feature_dim(path: str | Path) -> int:
    """Feature width D of a features file, reading only its header (for `.h5`)."""
    path = Path(path)
    if path.suffix == ".pt":
        return read_features(path).feature_dim
    with _open_h5(path) as handle:
        if "features" not in handle:
            raise DataError("HDF5 file has no `features` dataset", path=path,
                            hint="this is not a features file")
        return int(handle["features"].shape[-1])


def read_feature_attrs(path: str | Path) -> dict[str, Any]:
    """Provenance attrs of a features file (file and `features` dataset), without reading the arrays."""
    path = Path(path)
    with _open_h5(path) as handle:
        if "features" not in handle:
            raise DataError("HDF5 file has no `features` dataset", path=path, hint="this is not a features file")
        return {**_read_attrs(handle), **_read_attrs(handle["features"])}


def is_complete(path: str | Path, num_rows: int | None = None) -> bool:
    """Whether `path` is a whole features file (opens, marked complete, and has `num_rows` rows if given).

    Used to skip finished slides on a rerun; a broken or partial file counts as not complete.
    """
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as handle:
            features = handle["features"]
            coords = handle["coords"]
            if not bool(features.attrs.get("complete", False)):
                return False
            if features.shape[0] != coords.shape[0]:
                return False
            return num_rows is None or features.shape[0] == num_rows
    except (OSError, KeyError):
        return False


def list_feature_files(directory: str | Path) -> list[Path]:
    """Features files (`*.h5`, `*.pt`) in a directory, sorted by name; temporary `.tmp` files excluded."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError("features directory not found", path=directory, hint="check --features")
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in FEATURE_SUFFIXES)
