"""ImageFolder trees (`root/{train,val,test}/<class>/*`) and their per-dataset pixel statistics.

Class indices come from the training split (sorted folder names) and are shared by every split, so a
class missing from validation does not shift the others. Microscopy datasets differ widely in colour,
so normalisation uses the dataset's own mean and std (`mambascope stats ROOT` writes `stats.json`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mambascope.atomic import write_text_atomic
from mambascope.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
SPLITS = ("train", "val", "test")
STATS_FILE = "stats.json"


@dataclass
class ImageSplit:
    """The images of one split with their class indices."""

    name: str
    paths: list[Path]
    labels: list[int]
    class_names: list[str]


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted for reproducibility."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"image cannot be read ({exc})", path=path,
                        hint="remove or re-save the file as PNG/JPEG/TIFF") from None


def class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_split(root: str | Path, split: str, class_names: Sequence[str] | None = None) -> ImageSplit:
    """One split of an ImageFolder tree; `class_names` fixes the classes (default: this split's folders).

    A class folder unknown to `class_names` is an error; a known class without images only warns.
    """
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DataError(f"ImageFolder split {split!r} not found", path=split_dir,
                        hint="arrange images as ROOT/{train,val,test}/<class>/<image>")
    found = class_folders(split_dir)
    names = found if class_names is None else list(class_names)
    if not names:
        raise DataError("split has no class folders", path=split_dir, hint="put images in ROOT/<split>/<class>/")
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise DataError(f"class folders {', '.join(unknown)} are not among the classes {', '.join(names)}",
                        path=split_dir, hint="use the same class folders in every split")
    paths: list[Path] = []
    labels: list[int] = []
    empty = []
    for index, name in enumerate(names):
        images = list_images(split_dir / name) if (split_dir / name).is_dir() else []
        if not images:
            empty.append(name)
        paths += images
        labels += [index] * len(images)
    if empty and (class_names is None or split == "train"):
        raise DataError(f"classes {', '.join(empty)} have no images in the {split} split", path=split_dir,
                        hint="every class needs training images")
    if empty:
        warnings.warn(f"classes {', '.join(empty)} have no images in the {split} split ({split_dir}); "
                      "their metrics will be undefined", UserWarning, stacklevel=2)
    return ImageSplit(split, paths, labels, names)


def load_image_folder(root: str | Path, splits: Sequence[str] = SPLITS) -> dict[str, ImageSplit]:
    """The given splits, with the classes of the training split (or of the first split given)."""
    first = load_split(root, splits[0])
    result = {splits[0]: first}
    for split in splits[1:]:
        result[split] = load_split(root, split, first.class_names)
    return result


class ImageListDataset(Dataset):
    """(image tensor, class index) for a list of image files."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int] | None = None,
                 transform: Callable[[np.ndarray], torch.Tensor] | None = None):
        self.paths = list(paths)
        self.labels = None if labels is None else list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def patch_labels(self) -> np.ndarray:
        if self.labels is None:
            raise DataError("this image dataset has no labels", hint="pass labels to ImageListDataset")
        return np.asarray(self.labels, dtype=np.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = read_rgb(self.paths[index])
        tensor = self.transform(image) if self.transform else torch.from_numpy(image).permute(2, 0, 1)
        return tensor, -1 if self.labels is None else self.labels[index]


@dataclass
class DatasetStats:
    """Per-channel mean and std of pixel values scaled to [0, 1], over all pixels of all images."""

    mean: list[float]
    std: list[float]
    num_images: int
    num_pixels: int
    fingerprint: str


def files_fingerprint(paths: Sequence[Path]) -> str:
    """Cheap fingerprint of a file list: names, sizes and modification times."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def compute_stats(paths: Sequence[Path], progress: Callable[[int], None] | None = None) -> DatasetStats:
    """Exact pixel mean and std over the images (float64 sums, so large datasets stay accurate)."""
    if not paths:
        raise DataError("no images to compute statistics on", hint="check the dataset root")
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for path in paths:
        pixels = read_rgb(path).reshape(-1, 3).astype(np.float64) / 255.0
        total += pixels.sum(0)
        total_sq += np.square(pixels).sum(0)
        count += pixels.shape[0]
        if progress is not None:
            progress(1)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return DatasetStats([float(v) for v in mean], [float(v) for v in std], len(paths), count,
                        files_fingerprint(paths))


def stats_images(root: str | Path, split: str = "train") -> list[Path]:
    """The images statistics are computed on: `root/split` when it exists, else all of `root`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("dataset root not found", path=root, hint="give the ImageFolder root")
    folder = root / split if (root / split).is_dir() else root
    images = list_images(folder)
    if not images:
        raise DataError("no images found", path=folder, hint=f"image files end in {', '.join(IMAGE_EXTENSIONS)}")
    return images


def read_stats(path: str | Path) -> DatasetStats | None:
    """A stats file, or None when it is missing or broken."""
    path = Path(path)
    try:
        return DatasetStats(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError):
        return None


def dataset_stats(root: str | Path, split: str = "train", out_path: str | Path | None = None,
                  progress: Callable[[int], None] | None = None) -> tuple[DatasetStats, Path, bool]:
    """Compute (or reuse, when the images are unchanged) the stats and write them as JSON.

    Returns (stats, file written, whether the file was reused).
    """
    images = stats_images(root, split)
    out = Path(out_path) if out_path is not None else Path(root) / STATS_FILE
    existing = read_stats(out)
    if existing is not None and existing.fingerprint == files_fingerprint(images):
        return existing, out, True
    stats = compute_stats(images, progress)
    write_text_atomic(out, json.dumps(asdict(stats), indent=2))
    return stats, out, False
