"""Fixtures for the segmentation tests: BraTS case folders built from the bundled real MRI case.

The bundled TCGA-FG-6692 case (240x240x155, 1 mm, LPS, BraTS 2021 labels 1, 2, 4) is written under BraTS
file names. To keep CPU time small it is subsampled by a stride (the affine scaled to match, so it stays a
valid volume in the same world space); different offsets give distinct but real cases for splits.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from mambascope.data.brats import CONVENTIONS
from mambascope.sample_data import sample_path

SAMPLE_NAMES = {"t1": "t1", "t1ce": "t1c", "t2": "t2", "flair": "flair", "seg": "seg_fusion_simple"}


def subsampled(name: str, stride: int, offset: int = 0) -> nib.Nifti1Image:
    """A bundled volume keeping every `stride`-th voxel from `offset`, with the matching affine."""
    image = nib.load(str(sample_path(f"TCGA-FG-6692/{SAMPLE_NAMES[name]}.nii.gz")))
    data = np.asanyarray(image.dataobj)[offset::stride, offset::stride, offset::stride]
    affine = image.affine @ np.diag([stride, stride, stride, 1.0])
    affine[:3, 3] = image.affine[:3, :3] @ np.full(3, offset) + image.affine[:3, 3]
    return nib.Nifti1Image(np.ascontiguousarray(data), affine)


def write_case(root: Path, case_id: str, stride: int = 4, offset: int = 0, convention: str = "2021",
               with_label: bool = True) -> Path:
    """Write one BraTS case folder under `root` from the bundled case; returns the folder."""
    conv = CONVENTIONS[convention]
    folder = root / case_id
    folder.mkdir(parents=True, exist_ok=True)
    names = ["t1", "t1ce", "t2", "flair", *(["seg"] if with_label else [])]
    suffixes = [*conv.image_suffixes, conv.label_suffix]
    for name, suffix in zip(names, suffixes, strict=False):
        image = subsampled(name, stride, offset)
        if name == "seg" and conv.et_label != 4:
            data = np.asanyarray(image.dataobj).copy()
            data[data == 4] = conv.et_label
            image = nib.Nifti1Image(data, image.affine)
        nib.save(image, str(folder / f"{case_id}{conv.separator}{suffix}.nii.gz"))
    return folder


def write_dataset(root: Path, n_cases: int = 3, stride: int = 4, convention: str = "2021") -> Path:
    """`n_cases` real cases (subsampled at different offsets) under `root`."""
    prefix = "BraTS2021_" if convention == "2021" else "BraTS-GLI-"
    for i in range(n_cases):
        write_case(root, f"{prefix}{i:05d}", stride=stride, offset=i % stride, convention=convention)
    return root
