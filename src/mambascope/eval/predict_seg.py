"""Segment BraTS cases: sliding-window inference, flip test-time augmentation, label maps in input space.

Each case goes through the "infer" MONAI pipeline (RAS, brain crop, z-score), is predicted patch by patch
(overlap 0.5, Gaussian weights), mapped back onto the input voxel grid with `monai.transforms.Invertd`,
thresholded at 0.5 into TC/WT/ET and written as a BraTS label map with the input's affine and shape.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mambascope.atomic import atomic_path, write_text_atomic
from mambascope.data.brats import (
    REGIONS,
    BratsCase,
    brats_transforms,
    check_case,
    labels_to_regions,
    regions_to_labels,
)
from mambascope.errors import DataError, MambascopeError
from mambascope.eval.segmentation import case_metrics, summarize

Predictor = Callable[[torch.Tensor], torch.Tensor]

EMPTY_MASK_RULES = (
    "Dice: both masks empty -> 1, exactly one empty -> 0. HD95 (mm): both empty -> 0, exactly one empty -> "
    "the volume diagonal in mm (BraTS convention)."
)


@dataclass(frozen=True)
class InferenceSettings:
    """How to run the sliding window: window size, overlap, windows per forward pass, flips."""

    roi_size: tuple[int, int, int] = (128, 128, 128)
    overlap: float = 0.5
    sw_batch_size: int = 2
    tta: bool = False
    device: str = "cpu"


def flip_sets(tta: bool) -> list[tuple[int, ...]]:
    """Spatial axes (of a (B, C, D, H, W) tensor) to mirror: none, or all 8 combinations with TTA."""
    if not tta:
        return [()]
    axes = (2, 3, 4)
    return [combo for r in range(4) for combo in itertools.combinations(axes, r)]


def plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (models and scans need no metadata riding along)."""
    as_tensor = getattr(tensor, "as_tensor", None)
    return as_tensor() if callable(as_tensor) else tensor


@torch.no_grad()
def sliding_window_logits(predictor: Predictor, image: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """Logits (B, regions, D, H, W) of a preprocessed (B, C, D, H, W) image, windows blended by Gaussian weights."""
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(plain_tensor(image), list(settings.roi_size), settings.sw_batch_size, predictor,
                                    overlap=settings.overlap, mode="gaussian")


def sliding_window_probabilities(predictor: Predictor, image: torch.Tensor,
                                 settings: InferenceSettings) -> torch.Tensor:
    """Sigmoid probabilities (B, regions, D, H, W) of a preprocessed (B, C, D, H, W) image.

    With TTA the image is mirrored along every combination of axes, predicted, mirrored back, and the
    probabilities averaged.
    """
    total = None
    flips = flip_sets(settings.tta)
    for axes in flips:
        view = image.flip(axes) if axes else image
        probs = torch.sigmoid(sliding_window_logits(predictor, view, settings).float())
        probs = probs.flip(axes) if axes else probs
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(flips)


@dataclass
class CaseResult:
    """One predicted case: where its label map went, and its metrics when the case had labels."""

    case_id: str
    output: Path
    metrics: dict[str, float] | None = None
    skipped: bool = False


def _complete_output(path: Path, shape: tuple[int, ...]) -> bool:
    """A previous label map that opens and has the input's shape (a rerun keeps it)."""
    import nibabel as nib

    if not path.is_file():
        return False
    try:
        image = nib.load(str(path))
        return tuple(image.shape) == shape and np.asanyarray(image.dataobj).size > 0
    except Exception:  # a truncated or corrupt file is redone
        return False


def predict_label_map(predictor: Predictor, case: BratsCase, settings: InferenceSettings,
                      et_label: int) -> np.ndarray:
    """The BraTS label map (uint8, input voxel grid) predicted for one case."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    transforms = brats_transforms("infer", et_label=et_label)
    data = transforms(case.as_record(with_label=False))
    image = data["image"]
    probs = sliding_window_probabilities(predictor, image[None].to(settings.device), settings)[0].cpu()
    data["pred"] = MetaTensor(probs, meta=dict(image.meta), applied_operations=list(image.applied_operations))
    inverted = Invertd(keys="pred", transform=transforms, orig_keys="image", nearest_interp=False)(data)["pred"]
    regions = np.asarray(inverted) > 0.5
    return regions_to_labels(regions, et_label)


def write_label_map(labels: np.ndarray, reference: Path, out_path: Path) -> Path:
    """Save labels as NIfTI with the reference volume's affine and header (uint8), atomically."""
    import nibabel as nib

    ref = nib.load(str(reference))
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    image = nib.Nifti1Image(labels.astype(np.uint8), ref.affine, header)
    image.header.set_slope_inter(1, 0)
    with atomic_path(out_path) as tmp:
        tmp.write_bytes(gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))  # reproducible bytes
    return out_path


def score_case(case: BratsCase, labels: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice / HD95 per region of a predicted label map against the case's label file."""
    import nibabel as nib

    assert case.label is not None
    truth = np.asanyarray(nib.load(str(case.label)).dataobj)
    return case_metrics(labels_to_regions(labels, case.et_label), labels_to_regions(truth, case.et_label),
                        spacing)


@dataclass
class PredictionReport:
    """All cases of one prediction run: results, failures (case id -> message), metric summary."""

    results: list[CaseResult] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    summary: dict[str, float] | None = None
    metrics_csv: Path | None = None
    metrics_json: Path | None = None


def predict_cases(predictor: Predictor, cases: Sequence[BratsCase | MambascopeError], out_dir: str | Path,
                  settings: InferenceSettings, et_label: int | None = None,
                  progress: Callable[[str], None] | None = None) -> PredictionReport:
    """Write `<out_dir>/<case_id>.nii.gz` for every case; metrics for cases with labels.

    `cases` may hold errors from case discovery: they are recorded as failures. A failing case is recorded
    and the rest go on (the caller raises BatchError when `report.failures` is not empty). A complete
    earlier output is kept, not recomputed, and still scored. `et_label` defaults to each case's own
    convention, so a 2023 case gets label 3 for enhancing tumour.
    """
    import nibabel as nib

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = PredictionReport()
    rows = []
    for case in cases:
        if isinstance(case, MambascopeError):
            report.failures[Path(case.path or "?").name] = case.one_line()
            continue
        if progress is not None:
            progress(case.case_id)
        try:
            geometry = check_case(case, check_labels=case.label is not None)
            label_value = case.et_label if et_label is None else et_label
            out_path = out_dir / f"{case.case_id}.nii.gz"
            skipped = _complete_output(out_path, geometry.shape)
            if skipped:
                labels = np.asanyarray(nib.load(str(out_path)).dataobj).astype(np.uint8)
            else:
                labels = predict_label_map(predictor, case, settings, label_value)
                if labels.shape != geometry.shape:
                    raise DataError(f"case {case.case_id}: prediction shape {labels.shape} does not match the "
                                    f"input {geometry.shape}", path=case.folder)
                write_label_map(labels, case.images[0], out_path)
            metrics = score_case(case, labels, geometry.spacing) if case.label is not None else None
        except MambascopeError as exc:
            report.failures[case.case_id] = exc.one_line()
            continue
        report.results.append(CaseResult(case.case_id, out_path, metrics, skipped))
        if metrics is not None:
            rows.append({"case_id": case.case_id, **metrics})
    if rows:
        report.summary = summarize(rows)
        report.metrics_csv = _write_rows(out_dir / "metrics.csv", rows)
        report.metrics_json = write_text_atomic(out_dir / "metrics.json", json.dumps(
            {"mean": report.summary, "per_case": rows, "regions": list(REGIONS),
             "empty_masks": EMPTY_MASK_RULES}, indent=2) + "\n")
    return report


def _write_rows(path: Path, rows: Sequence[dict[str, object]]) -> Path:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
