"""A small labelled cohort of real slides cut from the bundled images, for the demo and tests.

The task — H&E versus Ki67 immunohistochemistry — is a demonstration that the pipeline learns from real
pixels, not a clinical benchmark. Each source image is cut into non-overlapping square regions of the
same physical size; regions that are less than half tissue are skipped; each region becomes a separate
pyramidal TIFF "slide" with its true resolution. `case_id` is the source image, so splits by case keep
regions of one source together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mambascope.atomic import atomic_path
from mambascope.sample_data import sample_path
from mambascope.slides.pyramid_tiff import write_pyramidal_tiff
from mambascope.slides.reader import open_slide
from mambascope.slides.tissue import TissueParams, detect_tissue

#: tissue detection for regions of ~100 µm: keep tissue pieces down to 2,000 µm²
COHORT_TISSUE = TissueParams(min_area_um2=2_000.0, max_hole_area_um2=2_000.0)


@dataclass(frozen=True)
class CohortSource:
    """A bundled image, its stain (the label) and a short name used in slide ids."""

    sample: str
    label: str
    short_name: str


DEMO_SOURCES = (
    CohortSource("CMU-1-Small-Region.svs", "HE", "cmu1"),
    CohortSource("OS-1-detail.ome.tif", "HE", "os1"),
    CohortSource("OS-2-ndpi.ome.tif", "Ki67", "os2ndpi"),
    CohortSource("OS-2-vsi.ome.tif", "Ki67", "os2vsi"),
)


def _regions(image: np.ndarray, size: int) -> list[tuple[int, int]]:
    """Top-left corners of the non-overlapping `size`×`size` squares that fit in `image`."""
    h, w = image.shape[:2]
    return [(x, y) for y in range(0, h - size + 1, size) for x in range(0, w - size + 1, size)]


def build_demo_cohort(
    out_dir: str | Path,
    *,
    region_um: float = 128.0,
    max_per_class: int = 12,
    min_tissue: float = 0.5,
    seed: int = 0,
) -> Path:
    """Write the cohort's slides and `labels.csv` (slide_id, path, label, case_id, split) under `out_dir`.

    Regions are `region_um` microns square; at most `max_per_class` per label, taken evenly from each
    label's sources. Returns the path of `labels.csv`. Existing slides are reused.
    """
    out_dir = Path(out_dir)
    slides_dir = out_dir / "slides"
    candidates: dict[str, list[tuple[CohortSource, np.ndarray, int, float]]] = {}
    for source in DEMO_SOURCES:
        with open_slide(sample_path(source.sample)) as slide:
            width, height = slide.dimensions
            image = slide.read_region((0, 0), 0, (width, height))
            mpp = slide.mpp
        if mpp is None:
            raise RuntimeError(f"bundled sample {source.sample} has no resolution metadata")
        size = round(region_um / mpp)
        for index, (x, y) in enumerate(_regions(image, size)):
            region = image[y:y + size, x:x + size]
            if detect_tissue(region, mpp, COHORT_TISSUE).mean() >= min_tissue:
                candidates.setdefault(source.label, []).append((source, region, index, mpp))
    rows = []
    for label, regions in sorted(candidates.items()):
        by_source: dict[str, list] = {}
        for item in regions:
            by_source.setdefault(item[0].short_name, []).append(item)
        chosen = _round_robin(list(by_source.values()), max_per_class)
        for source, region, index, mpp in chosen:
            slide_id = f"{source.short_name}-r{index:02d}"
            path = slides_dir / f"{slide_id}.tif"
            if not path.exists():
                write_pyramidal_tiff(path, np.ascontiguousarray(region), mpp, tile=128, min_size=128)
            rows.append({"slide_id": slide_id, "path": f"slides/{path.name}", "label": label,
                         "case_id": source.short_name})
    table = assign_splits(pd.DataFrame(rows).sort_values("slide_id").reset_index(drop=True), seed=seed)
    labels_csv = out_dir / "labels.csv"
    with atomic_path(labels_csv) as tmp:
        table.to_csv(tmp, index=False)
    return labels_csv


def _round_robin(groups: list[list], limit: int) -> list:
    """Take items from each group in turn until `limit` are taken, so every source is represented."""
    chosen: list = []
    queues = [list(group) for group in groups]
    while len(chosen) < limit and any(queues):
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    return chosen


def assign_splits(table: pd.DataFrame, *, seed: int = 0, val_share: float = 0.2,
                  test_share: float = 0.3) -> pd.DataFrame:
    """Add a `split` column (train/val/test), stratified by label, with at least one val and test slide
    per label; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    split = pd.Series("train", index=table.index)
    for _, group in table.groupby("label"):
        order = rng.permutation(group.index.to_numpy())
        n_test = max(1, round(test_share * len(order)))
        n_val = max(1, round(val_share * len(order)))
        split[order[:n_test]] = "test"
        split[order[n_test:n_test + n_val]] = "val"
    return table.assign(split=split)
