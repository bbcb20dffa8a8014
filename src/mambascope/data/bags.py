"""Slide labels and MIL bags: the labels CSV, its features files, and a dataset of one bag per slide.

The labels CSV has columns `slide_id`, `label` (class names or integers) and optionally `case_id`
(slides of one patient stay in one split) and `split` (`train`, `val`, `test`). Each slide's bag is
its features file `<features>/<slide_id>.h5` (or CLAM `.pt`), read with `mambascope.features.store`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mambascope.errors import DataError
from mambascope.features.store import FEATURE_SUFFIXES, feature_dim, read_features

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}


@dataclass(frozen=True)
class SlideLabel:
    """One row of the labels CSV; `label` indexes `LabelTable.class_names`."""

    slide_id: str
    label: int
    case_id: str
    split: str | None


@dataclass(frozen=True)
class LabelTable:
    """The labels CSV, parsed: its rows and the ordered class names."""

    rows: list[SlideLabel]
    class_names: list[str]
    path: Path

    @property
    def has_splits(self) -> bool:
        return any(row.split is not None for row in self.rows)

    def labels(self) -> np.ndarray:
        return np.asarray([row.label for row in self.rows], dtype=np.int64)


@dataclass(frozen=True)
class SlideBag:
    """A labelled slide whose features file was found."""

    slide_id: str
    label: int
    case_id: str
    split: str | None
    path: Path


def _class_names_from(values: Sequence[str]) -> list[str]:
    """Sorted distinct labels; numerically when every label is an integer (so "10" follows "9")."""
    distinct = sorted(set(values))
    if all(v.lstrip("-").isdigit() for v in distinct):
        return sorted(distinct, key=int)
    return distinct


def read_label_table(path: str | Path, class_names: Sequence[str] | None = None) -> LabelTable:
    """Parse the labels CSV. With `class_names`, labels may be those names or indices into them."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError("labels CSV not found", path=path, hint="check --labels")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"labels CSV cannot be parsed ({type(exc).__name__})", path=path,
                        hint="write a CSV with a header row: slide_id,label[,case_id][,split]") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in ("slide_id", "label") if c not in frame.columns]
    if missing:
        raise DataError(f"labels CSV lacks column(s) {', '.join(missing)} (has: {', '.join(frame.columns)})",
                        path=path, hint="the CSV needs columns slide_id and label; case_id and split are optional")
    frame = frame.apply(lambda col: col.str.strip())
    if frame.empty:
        raise DataError("labels CSV has no rows", path=path, hint="add one row per slide")
    empty_labels = frame.loc[frame["label"] == "", "slide_id"].tolist()
    if empty_labels:
        raise DataError(f"{len(empty_labels)} slide(s) have no label: {', '.join(empty_labels[:5])}", path=path,
                        hint="fill the label column or remove those rows")
    duplicated = sorted(set(frame.loc[frame["slide_id"].duplicated(), "slide_id"]))
    if duplicated:
        raise DataError(f"slide ids listed more than once: {', '.join(duplicated[:5])}", path=path,
                        hint="keep one row per slide")
    names = list(class_names) if class_names else _class_names_from(frame["label"].tolist())
    index = {name: i for i, name in enumerate(names)}
    rows = []
    for record in frame.to_dict("records"):
        raw = record["label"]
        if raw in index:
            label = index[raw]
        elif class_names and raw.isdigit() and int(raw) < len(names):
            label = int(raw)
        else:
            raise DataError(f"slide {record['slide_id']} has label {raw!r}, not one of {names}", path=path,
                            hint="use the class names (or indices) the model was trained with")
        split_raw = record.get("split", "").lower()
        if split_raw and split_raw not in _SPLIT_ALIASES:
            raise DataError(f"slide {record['slide_id']} has split {record['split']!r}", path=path,
                            hint="split values are train, val or test (or leave the cell empty)")
        rows.append(SlideLabel(slide_id=record["slide_id"], label=label,
                               case_id=record.get("case_id") or record["slide_id"],
                               split=_SPLIT_ALIASES.get(split_raw)))
    return LabelTable(rows=rows, class_names=names, path=path)


def _find_features_file(features_dir: Path, slide_id: str) -> Path | None:
    for suffix in FEATURE_SUFFIXES:
        candidate = features_dir / f"{slide_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def attach_features(table: LabelTable, features_dir: str | Path, skip_missing: bool = False
                    ) -> tuple[list[SlideBag], list[str]]:
    """Pair each CSV row with its features file. Returns the bags and the slide ids skipped.

    Slides without a file are an error listing them all, unless `skip_missing` drops them with a warning.
    """
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise DataError("features directory not found", path=features_dir, hint="check --features")
    bags, missing = [], []
    for row in table.rows:
        path = _find_features_file(features_dir, row.slide_id)
        if path is None:
            missing.append(row.slide_id)
        else:
            bags.append(SlideBag(row.slide_id, row.label, row.case_id, row.split, path))
    if missing and not skip_missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataError(f"{len(missing)} slide(s) in the labels CSV have no features file: {shown}",
                        path=features_dir, hint="extract their features, or pass --skip-missing to leave them out")
    if missing:
        log.warning("skipping %d slide(s) without features: %s", len(missing), ", ".join(missing))
    if not bags:
        raise DataError("no slide in the labels CSV has a features file", path=features_dir,
                        hint="check that --features holds <slide_id>.h5 files for the CSV's slide ids")
    return bags, missing


def common_feature_dim(bags: Sequence[SlideBag]) -> int:
    """The feature width shared by all bags; mixed widths (different encoders) are an error."""
    dims: dict[int, list[str]] = {}
    for bag in bags:
        dims.setdefault(feature_dim(bag.path), []).append(bag.slide_id)
    if len(dims) > 1:
        detail = "; ".join(f"{d}: {', '.join(ids[:3])}{'…' if len(ids) > 3 else ''}" for d, ids in sorted(dims.items()))
        raise DataError(f"features have mixed dimensions ({detail})", path=bags[0].path.parent,
                        hint="extract all slides with the same encoder")
    return next(iter(dims))


class BagDataset(Dataset):
    """One item per slide: its features (N, D) float32, coords (N, 2) or None, label and position.

    `max_patches` keeps a random subset of that many patches (in their original order, so sequence
    and grid models still see neighbours in order) — for training; evaluation uses every patch.
    With `grid_multiple` (for grid models such as mamba2d), each item also carries the bag's
    `PatchGrid` under "grid": built here, so in the DataLoader's worker processes when there are any,
    and the training step does not wait on it.
    """

    def __init__(self, bags: Sequence[SlideBag], max_patches: int | None = None,
                 grid_multiple: int | None = None):
        self.bags = list(bags)
        self.max_patches = max_patches
        self.grid_multiple = grid_multiple

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, index: int) -> dict:
        bag = self.bags[index]
        data = read_features(bag.path)
        if len(data) == 0:
            raise DataError(f"empty bag: slide {bag.slide_id} has no patch features", path=bag.path,
                            hint="re-run tiling (no tissue found?) or drop the slide from the CSV")
        features = torch.from_numpy(np.ascontiguousarray(data.features)).float()
        coords = None if data.coords is None else torch.from_numpy(np.ascontiguousarray(data.coords))
        if self.max_patches and features.shape[0] > self.max_patches:
            keep = torch.randperm(features.shape[0])[: self.max_patches].sort().values
            features = features[keep]
            coords = None if coords is None else coords[keep]
        item = {"features": features, "coords": coords, "label": torch.tensor(bag.label), "index": index}
        if self.grid_multiple is not None:
            from mambascope.models.mil.grid import patch_grid  # importing the models package loads timm

            try:
                item["grid"] = patch_grid(coords, features.shape[0], multiple=self.grid_multiple)
            except DataError as error:
                raise DataError(f"slide {bag.slide_id}: {error.message}", path=bag.path, hint=error.hint) from None
        return item


def single_bag(batch: list[dict]) -> dict:
    """DataLoader collate for batch size 1: bags have different lengths, so they are never stacked."""
    if len(batch) != 1:
        raise ValueError(f"MIL loaders use batch_size=1, got {len(batch)} bags")
    return batch[0]
