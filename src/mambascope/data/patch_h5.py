"""Patch HDF5 files (`<root>/<sample_id>/<patch_dir>/<sample_id>_patches.h5`, key `data`) as a dataset.

Every patch inherits the label of its sample (from a metadata CSV); splits are drawn by sample, never
by patch, so patches of one slide never sit on both sides of a split. Opening thousands of HDF5 files
to count their patches is slow, so the per-file facts are cached in a JSON manifest keyed by the files'
sizes and modification times: a second start with unchanged files reads one small file instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mambascope.atomic import write_text_atomic
from mambascope.errors import DataError

PATCH_KEY = "data"
PATCH_SUFFIX = "_patches.h5"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class PatchFileInfo:
    """What the manifest records about one sample's patch file."""

    sample_id: str
    path: str
    num_patches: int
    height: int
    width: int


@dataclass
class PatchManifest:
    """All patch files of a dataset; `from_cache` tells whether the cache answered."""

    files: list[PatchFileInfo]
    from_cache: bool
    cache_path: Path | None


@dataclass
class LabelledPatches:
    """Patch files with one class index per file (the sample's label) and the class names."""

    files: list[PatchFileInfo]
    labels: list[int]
    class_names: list[str]
    from_cache: bool

    def subset(self, sample_ids: Sequence[str]) -> LabelledPatches:
        """The files (and labels) of the given samples, in the given order."""
        index = {info.sample_id: i for i, info in enumerate(self.files)}
        chosen = [index[s] for s in sample_ids]
        return LabelledPatches([self.files[i] for i in chosen], [self.labels[i] for i in chosen],
                               self.class_names, self.from_cache)

    @property
    def sample_labels(self) -> dict[str, str]:
        return {f.sample_id: self.class_names[y] for f, y in zip(self.files, self.labels, strict=True)}

    @property
    def patch_size(self) -> tuple[int, int]:
        return uniform_patch_size(self.files)


def patch_file_path(data_dir: str | Path, sample_id: str, patch_dir_name: str = "patches") -> Path:
    """Where the HistoMamba layout keeps a sample's patches."""
    return Path(data_dir) / sample_id / patch_dir_name / f"{sample_id}{PATCH_SUFFIX}"


def read_sample_labels(metadata_csv: str | Path, label_col: str, id_col: str = "id") -> dict[str, str]:
    """Map sample id -> label string from a metadata CSV with an id column and a label column."""
    import pandas as pd

    path = Path(metadata_csv)
    if not path.is_file():
        raise DataError("metadata CSV not found", path=path, hint="check --metadata-csv")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"metadata CSV cannot be parsed ({exc})", path=path,
                        hint="write a comma-separated file with a header row") from None
    for column, option in ((id_col, "--id-col"), (label_col, "--label-col")):
        if column not in table.columns:
            raise DataError(f"metadata CSV has no column {column!r} (columns: {', '.join(table.columns)})",
                            path=path, hint=f"name the right column with {option}")
    ids = table[id_col].str.strip()
    labels = table[label_col].str.strip()
    empty = sorted(ids[labels == ""].tolist())
    if empty:
        raise DataError(f"samples without a {label_col!r} label: {', '.join(empty[:10])}", path=path,
                        hint="fill in the label or remove those rows")
    duplicated = sorted(set(ids[ids.duplicated()].tolist()))
    if duplicated:
        raise DataError(f"sample ids listed more than once: {', '.join(duplicated[:10])}", path=path,
                        hint="keep one row per sample id")
    if table.empty:
        raise DataError("metadata CSV has no rows", path=path, hint="list one sample per row")
    return dict(zip(ids.tolist(), labels.tolist(), strict=True))


def inspect_patch_file(path: str | Path, sample_id: str) -> PatchFileInfo:
    """Open one patch file and check it holds `data` as (N, H, W, 3) uint8."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if PATCH_KEY not in handle:
                raise DataError(f"patch file has no dataset {PATCH_KEY!r} (has: {', '.join(handle.keys())})",
                                path=path, hint="write patches with `mambascope tile --save-patches`")
            data = handle[PATCH_KEY]
            shape, dtype = data.shape, data.dtype
    except OSError as exc:
        raise DataError(f"patch file cannot be opened as HDF5 ({exc})", path=path,
                        hint="re-create the file; it may be truncated") from None
    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
        raise DataError(f"patch data must be (N, H, W, 3) uint8, found {tuple(shape)} {dtype}", path=path,
                        hint="store RGB patches as uint8 under the key 'data'")
    if shape[0] == 0:
        raise DataError("patch file holds no patches", path=path, hint="remove the sample or re-tile it")
    return PatchFileInfo(sample_id, str(Path(path).resolve()), int(shape[0]), int(shape[1]), int(shape[2]))


def _manifest_key(paths: Mapping[str, Path]) -> str:
    """Fingerprint of the file set: ids, absolute paths, sizes and modification times."""
    digest = hashlib.sha256(f"v{MANIFEST_VERSION}".encode())
    for sample_id in sorted(paths):
        stat = os.stat(paths[sample_id])
        digest.update(f"{sample_id}\0{Path(paths[sample_id]).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                      .encode())
    return digest.hexdigest()[:24]


def build_manifest(paths: Mapping[str, Path], cache_dir: str | Path | None = None) -> PatchManifest:
    """Inspect every patch file, or read the cached result when no file changed since."""
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"manifest_{_manifest_key(paths)}.json"
        if cache_path.is_file():
            try:
                records = json.loads(cache_path.read_text())
                files = [PatchFileInfo(**record) for record in records]
                if sorted(f.sample_id for f in files) == sorted(paths):
                    return PatchManifest(files, from_cache=True, cache_path=cache_path)
            except (json.JSONDecodeError, TypeError):
                pass  # a broken cache is rebuilt below
    files = [inspect_patch_file(paths[s], s) for s in sorted(paths)]
    if cache_path is not None:
        write_text_atomic(cache_path, json.dumps([asdict(f) for f in files]))
    return PatchManifest(files, from_cache=False, cache_path=cache_path)


def uniform_patch_size(files: Sequence[PatchFileInfo]) -> tuple[int, int]:
    """The (height, width) shared by all files; mixed sizes are an error naming one of each."""
    sizes: dict[tuple[int, int], str] = {}
    for info in files:
        sizes.setdefault((info.height, info.width), info.path)
    if len(sizes) > 1:
        listed = "; ".join(f"{h}x{w} in {p}" for (h, w), p in sizes.items())
        raise DataError(f"patch files hold patches of mixed sizes ({listed})",
                        hint="tile all samples with the same --patch-size")
    if not sizes:
        raise DataError("no patch files", hint="check --data-dir")
    return next(iter(sizes))


def load_labelled_patches(data_dir: str | Path, metadata_csv: str | Path, label_col: str,
                          id_col: str = "id", patch_dir_name: str = "patches",
                          cache_dir: str | Path | None = None,
                          class_names: Sequence[str] | None = None) -> LabelledPatches:
    """Join the metadata CSV with the patch files on disk.

    Ids without a patch file are listed in one warning and skipped; if none remain it is an error.
    `class_names` fixes the label order (e.g. from a checkpoint); by default it is the sorted labels.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError("data directory not found", path=data_dir, hint="check --data-dir")
    labels = read_sample_labels(metadata_csv, label_col, id_col)
    paths = {s: patch_file_path(data_dir, s, patch_dir_name) for s in labels}
    missing = sorted(s for s, p in paths.items() if not p.is_file())
    if len(missing) == len(paths):
        raise DataError(f"none of the {len(paths)} ids in the metadata CSV has a patch file "
                        f"(expected e.g. {paths[missing[0]]})", path=data_dir,
                        hint="check --data-dir, --patch-dir-name and the id column")
    if missing:
        warnings.warn(f"skipping {len(missing)} sample(s) listed in {metadata_csv} without a patch file "
                      f"under {data_dir}: {', '.join(missing)}", UserWarning, stacklevel=2)
    present = {s: p for s, p in paths.items() if s not in set(missing)}
    manifest = build_manifest(present, cache_dir)
    uniform_patch_size(manifest.files)
    names = sorted({labels[s] for s in present}) if class_names is None else list(class_names)
    unknown = sorted({labels[s] for s in present} - set(names))
    if unknown:
        raise DataError(f"labels {', '.join(unknown)} are not among the model's classes {', '.join(names)}",
                        path=metadata_csv, hint="use data labelled with the classes the model was trained on")
    index = {name: i for i, name in enumerate(names)}
    return LabelledPatches(manifest.files, [index[labels[f.sample_id]] for f in manifest.files], names,
                           manifest.from_cache)


def split_samples(sample_labels: Mapping[str, str], val_fraction: float, test_fraction: float = 0.0,
                  seed: int = 0) -> dict[str, list[str]]:
    """Stratified split of *samples* into train/val/test; each class keeps at least one training sample."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(f"split fractions val={val_fraction}, test={test_fraction} must be in [0, 1) and "
                        "sum to less than 1", hint="e.g. --val-split 0.15 --test-split 0.15")
    rng = np.random.default_rng(seed)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for label in sorted(set(sample_labels.values())):
        ids = sorted(s for s, y in sample_labels.items() if y == label)
        rng.shuffle(ids)
        n_test = round(test_fraction * len(ids))
        n_val = round(val_fraction * len(ids))
        if n_test + n_val >= len(ids):  # keep one sample for training
            n_val = max(0, len(ids) - 1 - n_test)
            n_test = min(n_test, len(ids) - 1 - n_val)
        splits["test"] += ids[:n_test]
        splits["val"] += ids[n_test:n_test + n_val]
        splits["train"] += ids[n_test + n_val:]
    return {name: sorted(ids) for name, ids in splits.items()}


def check_split_classes(split_labels: Mapping[str, Sequence[int]], class_names: Sequence[str]) -> None:
    """Every class must be in the training split; a class absent from val/test only gets a warning."""
    for split, labels in split_labels.items():
        absent = [class_names[i] for i in range(len(class_names)) if i not in set(labels)]
        if not absent or not len(labels):
            continue
        if split == "train":
            raise DataError(f"classes {', '.join(absent)} have no samples in the training split",
                            hint="add samples of those classes or lower the validation/test fractions")
        warnings.warn(f"classes {', '.join(absent)} have no samples in the {split} split; their metrics "
                      "will be undefined", UserWarning, stacklevel=2)


class PatchH5Dataset(Dataset):
    """(image tensor, class index) for every patch of the given files; HDF5 handles open per worker."""

    def __init__(self, files: Sequence[PatchFileInfo], labels: Sequence[int] | None = None,
                 transform: Callable[[np.ndarray], torch.Tensor] | None = None):
        self.files = list(files)
        self.labels = None if labels is None else list(labels)
        self.transform = transform
        counts = np.array([f.num_patches for f in self.files], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(file number, patch number within that file) of a flat index."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        file_no = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return file_no, index - int(self._offsets[file_no])

    def patch_labels(self) -> np.ndarray:
        """Class index of every patch (the label of its sample), for weighted sampling."""
        if self.labels is None:
            raise DataError("this patch dataset has no labels", hint="pass labels to PatchH5Dataset")
        return np.repeat(np.asarray(self.labels, dtype=np.int64), np.diff(self._offsets))

    def read(self, index: int) -> np.ndarray:
        """The raw (H, W, 3) uint8 patch."""
        import h5py

        file_no, patch_no = self.locate(index)
        path = self.files[file_no].path
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = h5py.File(path, "r")
        return handle[PATCH_KEY][patch_no]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        patch = self.read(index)
        image = self.transform(patch) if self.transform else torch.from_numpy(patch).permute(2, 0, 1)
        label = -1 if self.labels is None else self.labels[self.locate(index)[0]]
        return image, label

    def __getstate__(self) -> dict[str, Any]:
        """Worker processes get no open handles (h5py handles cannot cross processes)."""
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
