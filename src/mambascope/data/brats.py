"""BraTS case folders: discovery under the 2021 and 2023 file names, checks, MONAI transforms, splits.

A case is one folder `<case_id>/` holding four MRI modalities and, for training, a label map:

* BraTS 2021: `<case_id>_{t1,t1ce,t2,flair,seg}.nii.gz`, enhancing tumour (ET) = label 4;
* BraTS 2023: `<case_id>-{t1n,t1c,t2w,t2f,seg}.nii.gz`, enhancing tumour = label 3.

The file names fix the label convention, and the label values found are checked against it, so a 2021
label map saved under 2023 names is caught instead of silently training on a wrong ET region. Models see
the three overlapping BraTS regions as channels: tumour core (TC), whole tumour (WT), enhancing tumour (ET).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from mambascope.atomic import write_text_atomic
from mambascope.errors import ConfigError, DataError

if TYPE_CHECKING:
    import nibabel
    from monai.transforms import Compose

#: order of the input channels, by the BraTS 2021 modality names
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: output channels of segmentation models, in this order
REGIONS: tuple[str, ...] = ("TC", "WT", "ET")
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")


@dataclass(frozen=True)
class LabelConvention:
    """How one BraTS release names its files and which label marks the enhancing tumour."""

    name: str
    separator: str
    image_suffixes: tuple[str, ...]  # in MODALITIES order
    label_suffix: str
    et_label: int

    @property
    def label_values(self) -> tuple[int, ...]:
        """0 background, 1 necrosis / non-enhancing core, 2 oedema, ET."""
        return (0, 1, 2, self.et_label)

    def file_names(self, case_id: str) -> list[str]:
        return [f"{case_id}{self.separator}{s}.nii.gz" for s in (*self.image_suffixes, self.label_suffix)]


CONVENTIONS: dict[str, LabelConvention] = {
    "2021": LabelConvention("2021", "_", ("t1", "t1ce", "t2", "flair"), "seg", et_label=4),
    "2023": LabelConvention("2023", "-", ("t1n", "t1c", "t2w", "t2f"), "seg", et_label=3),
}


@dataclass(frozen=True)
class BratsCase:
    """One case: its four modality files (MODALITIES order), optional label file, naming convention."""

    case_id: str
    folder: Path
    images: tuple[Path, ...]
    label: Path | None
    convention: str

    @property
    def et_label(self) -> int:
        return CONVENTIONS[self.convention].et_label

    def as_record(self, with_label: bool = True) -> dict[str, object]:
        """The dictionary MONAI's dictionary transforms read."""
        record: dict[str, object] = {"image": [str(p) for p in self.images], "case_id": self.case_id}
        if with_label and self.label is not None:
            record["label"] = str(self.label)
        return record


def _has_nifti(folder: Path) -> bool:
    return any(p.is_file() and p.name.endswith(NIFTI_SUFFIXES) for p in folder.iterdir())


def _match(folder: Path, tag: str) -> list[Path]:
    """Files in `folder` whose name ends with `<tag>.nii.gz` or `<tag>.nii` (tag includes the separator)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(tuple(tag + s for s in NIFTI_SUFFIXES)))


def list_case_dirs(root: str | Path) -> list[Path]:
    """Case folders under `root` (sorted), or `[root]` when `root` is itself one case folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("BraTS input folder not found", path=root,
                        hint="pass a folder of case folders, or one case folder")
    if _has_nifti(root):
        return [root]
    cases = sorted(p for p in root.iterdir() if p.is_dir() and _has_nifti(p))
    if not cases:
        raise DataError("no case folders with NIfTI files found", path=root,
                        hint="expected <root>/<case_id>/<case_id>_t1.nii.gz ... (BraTS 2021) "
                             "or <case_id>-t1n.nii.gz ... (BraTS 2023)")
    return cases


def load_case(folder: str | Path, require_label: bool = False) -> BratsCase:
    """Find a case's files under the BraTS 2021 or 2023 names; DataError naming the case if incomplete."""
    folder = Path(folder)
    case_id = folder.name
    found: dict[str, dict[str, list[Path]]] = {}
    for name, conv in CONVENTIONS.items():
        tags = {m: conv.separator + s for m, s in zip(MODALITIES, conv.image_suffixes, strict=True)}
        tags["label"] = conv.separator + conv.label_suffix
        found[name] = {key: _match(folder, tag) for key, tag in tags.items()}
    used = [name for name, files in found.items()
            if any(files[m] for m in MODALITIES)]
    if not used:
        raise DataError(f"case {case_id}: no BraTS modality files found", path=folder,
                        hint="name them " + ", ".join(CONVENTIONS["2021"].file_names(case_id))
                             + " (2021) or " + ", ".join(CONVENTIONS["2023"].file_names(case_id)) + " (2023)")
    if len(used) > 1:
        raise DataError(f"case {case_id}: mixes BraTS 2021 and 2023 file names", path=folder,
                        hint="use one naming scheme per case")
    name = used[0]
    conv = CONVENTIONS[name]
    files = found[name]
    images = []
    for modality, suffix in zip(MODALITIES, conv.image_suffixes, strict=True):
        matches = files[modality]
        if not matches:
            raise DataError(f"case {case_id}: missing modality {suffix} (BraTS {name} names)", path=folder,
                            hint=f"add {case_id}{conv.separator}{suffix}.nii.gz")
        if len(matches) > 1:
            raise DataError(f"case {case_id}: several files for modality {suffix}: "
                            f"{', '.join(p.name for p in matches)}", path=folder, hint="keep one")
        images.append(matches[0])
    labels = files["label"]
    if len(labels) > 1:
        raise DataError(f"case {case_id}: several label files", path=folder, hint="keep one")
    if require_label and not labels:
        raise DataError(f"case {case_id}: label file missing", path=folder,
                        hint=f"add {case_id}{conv.separator}{conv.label_suffix}.nii.gz (training needs labels)")
    return BratsCase(case_id=case_id, folder=folder, images=tuple(images),
                     label=labels[0] if labels else None, convention=name)


def find_cases(root: str | Path, require_label: bool = False) -> list[BratsCase]:
    """All cases under `root`, failing on the first incomplete one (training wants every case valid)."""
    return [load_case(folder, require_label) for folder in list_case_dirs(root)]


@dataclass(frozen=True)
class CaseGeometry:
    """What the NIfTI headers of a checked case say: voxel grid shape, affine, voxel spacing (mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]


def _load_header(path: Path, case_id: str) -> nibabel.spatialimages.SpatialImage:
    """Open a NIfTI lazily (header now, voxels on demand); DataError naming the case if unreadable."""
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for broken files
        raise DataError(f"case {case_id}: cannot read NIfTI file ({exc})", path=path,
                        hint="re-export the volume as .nii.gz") from None


def check_case(case: BratsCase, patch_size: Sequence[int] | None = None,
               check_labels: bool = True) -> CaseGeometry:
    """Check that all volumes share one 3D grid (shape and affine), the patch fits, and the label values.

    Raises DataError naming the case and the offending file.
    """
    files = [*case.images, *([case.label] if case.label is not None else [])]
    reference = _load_header(files[0], case.case_id)
    shape = tuple(int(s) for s in reference.shape)
    if len(shape) != 3:
        raise DataError(f"case {case.case_id}: expected a 3D volume, found shape {shape}", path=files[0],
                        hint="each modality must be one 3D NIfTI volume")
    affine = np.asarray(reference.affine, dtype=np.float64)
    for path in files[1:]:
        image = _load_header(path, case.case_id)
        if tuple(image.shape) != shape:
            raise DataError(f"case {case.case_id}: volume shape {tuple(image.shape)} differs from "
                            f"{files[0].name}'s {shape}", path=path,
                            hint="co-register and resample all modalities to one grid")
        if not np.allclose(image.affine, affine, atol=1e-3):
            raise DataError(f"case {case.case_id}: affine differs from {files[0].name}'s", path=path,
                            hint="co-register and resample all modalities to one grid")
    if patch_size is not None and any(p > s for p, s in zip(patch_size, shape, strict=True)):
        raise DataError(f"case {case.case_id}: patch size {tuple(patch_size)} is larger than the volume "
                        f"{shape}", path=case.folder, hint="choose a smaller --patch-size")
    if check_labels and case.label is not None:
        check_label_values(case)
    spacing = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return CaseGeometry(shape=shape, affine=affine, spacing=spacing)  # type: ignore[arg-type]


def check_label_values(case: BratsCase) -> tuple[int, ...]:
    """The label values in the case's label file; DataError if any is outside its convention."""
    assert case.label is not None
    data = np.asanyarray(_load_header(case.label, case.case_id).dataobj)
    values = np.unique(data)
    if not np.all(np.equal(np.round(values), values)):
        raise DataError(f"case {case.case_id}: label file holds non-integer values", path=case.label,
                        hint="labels must be integers 0, 1, 2 and the enhancing-tumour label")
    conv = CONVENTIONS[case.convention]
    unexpected = sorted(set(int(v) for v in values) - set(conv.label_values))
    if unexpected:
        other = [n for n, c in CONVENTIONS.items() if set(int(v) for v in values) <= set(c.label_values)]
        hint = (f"these look like BraTS {other[0]} labels: rename the files to the {other[0]} names"
                if other else f"BraTS {conv.name} labels are {conv.label_values}")
        raise DataError(f"case {case.case_id}: unexpected label values {unexpected} for BraTS {conv.name} "
                        f"(expected {list(conv.label_values)})", path=case.label, hint=hint)
    return tuple(int(v) for v in values)


def common_convention(cases: Sequence[BratsCase]) -> LabelConvention:
    """The one label convention of a data set; ConfigError if cases mix 2021 and 2023 names."""
    names = sorted({c.convention for c in cases})
    if len(names) != 1:
        raise ConfigError(f"cases mix BraTS label conventions {names}",
                          hint="use one BraTS release's names (and labels) for all cases of a run")
    return CONVENTIONS[names[0]]


def regions_to_labels(regions: np.ndarray, et_label: int) -> np.ndarray:
    """(3, ...) boolean TC, WT, ET masks -> BraTS label map (nested: WT=2, then TC=1, then ET)."""
    tc, wt, et = (np.asarray(r, dtype=bool) for r in regions)
    labels = np.zeros(tc.shape, dtype=np.uint8)
    labels[wt] = 2
    labels[tc] = 1
    labels[et] = et_label
    return labels


def labels_to_regions(labels: np.ndarray, et_label: int) -> np.ndarray:
    """BraTS label map -> (3, ...) boolean TC, WT, ET masks (MONAI's BraTS class conversion)."""
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

    return np.asarray(ConvertToMultiChannelBasedOnBratsClasses(et_label=et_label)(np.asarray(labels)))


Stage = Literal["train", "val", "infer"]


def brats_transforms(stage: Stage, et_label: int = 4, patch_size: Sequence[int] = (128, 128, 128),
                     num_samples: int = 2, pos_fraction: float = 2 / 3) -> Compose:
    """MONAI pipeline for one stage.

    All stages: load the four modalities as channels, orient to RAS, crop to the non-zero brain, z-score
    each channel over its non-zero voxels. "train"/"val" also turn labels into TC/WT/ET channels; "train"
    adds `num_samples` random patches per volume, a `pos_fraction` of them centred on tumour, random flips
    on all axes and random intensity scale/shift. "infer" keeps only the image (invertible, so predictions
    map back onto the input grid with `monai.transforms.Invertd`).
    """
    from monai import transforms as T

    keys = ["image"] if stage == "infer" else ["image", "label"]
    steps: list = [
        T.LoadImaged(keys=keys, image_only=True),
        T.EnsureChannelFirstd(keys=keys),
        T.EnsureTyped(keys="image", dtype=np.float32),
        T.Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if stage != "infer":
        steps.append(T.ConvertToMultiChannelBasedOnBratsClassesd(keys="label", et_label=et_label))
    steps += [
        T.CropForegroundd(keys=keys, source_key="image", allow_smaller=True),
        T.NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
    ]
    if stage == "train":
        steps += [
            T.SpatialPadd(keys=keys, spatial_size=list(patch_size)),
            T.RandCropByPosNegLabeld(keys=keys, label_key="label", image_key="image", image_threshold=0.0,
                                     spatial_size=list(patch_size), pos=pos_fraction, neg=1 - pos_fraction,
                                     num_samples=num_samples),
            T.RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            T.RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            T.RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
            T.RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            T.RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
        ]
    if stage != "infer":
        steps.append(T.EnsureTyped(keys="label", dtype=np.float32))
    return T.Compose(steps)


def split_cases(case_ids: Sequence[str], val_fraction: float = 0.2, test_fraction: float = 0.0,
                seed: int = 0) -> dict[str, list[str]]:
    """Shuffle case ids with `seed` and cut them into train / val / test (val gets at least one case)."""
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise ConfigError("case ids are not unique", hint="give every case folder its own name")
    if not (0 < val_fraction < 1) or not (0 <= test_fraction < 1) or val_fraction + test_fraction >= 1:
        raise ConfigError(f"split fractions val={val_fraction}, test={test_fraction} leave no training cases",
                          hint="use 0 < val, 0 <= test, val + test < 1")
    if len(ids) < 2:
        raise ConfigError(f"need at least 2 cases to split into training and validation, found {len(ids)}",
                          hint="add cases to the data folder")
    random.Random(seed).shuffle(ids)
    n_val = max(1, round(val_fraction * len(ids)))
    n_test = round(test_fraction * len(ids))
    if n_val + n_test >= len(ids):
        raise ConfigError(f"{len(ids)} cases are too few for val={val_fraction} and test={test_fraction}",
                          hint="lower the fractions or add cases")
    return {"train": sorted(ids[n_val + n_test:]), "val": sorted(ids[:n_val]),
            "test": sorted(ids[n_val:n_val + n_test])}


def save_splits(path: str | Path, splits: dict[str, list[str]]) -> Path:
    return write_text_atomic(path, json.dumps(splits, indent=2) + "\n")


def load_splits(path: str | Path, known_ids: Sequence[str]) -> dict[str, list[str]]:
    """Read a splits JSON and check every case it names exists."""
    path = Path(path)
    try:
        splits = json.loads(path.read_text())
        splits = {k: [str(c) for c in splits.get(k, [])] for k in ("train", "val", "test")}
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"cannot read splits file ({exc})", path=path, hint="delete it to re-split") from None
    missing = sorted(set().union(*splits.values()) - set(known_ids))
    if missing:
        raise DataError(f"splits file names cases not in the data folder: {', '.join(missing[:5])}", path=path,
                        hint="point --data at the same cases, or delete the splits file to re-split")
    if not splits["train"] or not splits["val"]:
        raise DataError("splits file has an empty train or val list", path=path, hint="delete it to re-split")
    return splits
