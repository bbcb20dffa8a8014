"""Which slides to extract: pair slides with coordinates files, skip finished outputs, record outcomes."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mambascope.atomic import atomic_path
from mambascope.errors import DataError, MambascopeError
from mambascope.features.store import features_path, is_complete, read_feature_attrs
from mambascope.slides.reader import SlideEntry


@dataclass(frozen=True)
class SlideJob:
    """One slide to encode: its file, its coordinates file, where the features go, how many patches."""

    slide_id: str
    slide_path: Path
    coords_path: Path
    out_path: Path
    num_patches: int
    mpp_override: float | None = None


@dataclass
class SlideOutcome:
    """What happened to one slide (`done`, `skipped` because already complete, or `failed` with why)."""

    slide_id: str
    status: str
    num_patches: int = 0
    out_path: Path | None = None
    error: str = ""
    seconds: float = 0.0
    zero_filled: int = 0


def resolve_coords_dir(coords: str | Path) -> Path:
    """`--coords` may name the tiling output folder or its `coords/` sub-folder."""
    coords = Path(coords)
    if (coords / "coords").is_dir():
        return coords / "coords"
    if not coords.is_dir():
        raise DataError("coordinates folder not found", path=coords,
                        hint="pass the --out folder of `mambascope tile` (or its coords/ sub-folder)")
    return coords


def _count_coords(path: Path) -> int:
    """Number of patches in a coordinates file (reads only the header)."""
    import h5py

    if not path.is_file():
        raise DataError("coordinates file not found", path=path,
                        hint="run `mambascope tile` for this slide, or check --coords")
    try:
        with h5py.File(path, "r") as handle:
            dataset = handle["coords"]
            if dataset.ndim != 2 or dataset.shape[1] != 2:
                raise DataError(f"coords must have shape (N, 2), found {dataset.shape}", path=path,
                                hint="pass a coordinates file written by mambascope tile, CLAM or TRIDENT")
            return int(dataset.shape[0])
    except KeyError:
        raise DataError("no `coords` dataset in HDF5 file", path=path,
                        hint="pass a coordinates file written by mambascope tile, CLAM or TRIDENT") from None
    except OSError:
        raise DataError("coordinates file is not a readable HDF5 file (truncated or corrupt?)", path=path,
                        hint="delete it and rerun `mambascope tile`") from None


def _existing_output_conflict(job: SlideJob, encoder: str, weights: str) -> str | None:
    """Why a complete output cannot be reused (made by another encoder or weights), or None."""
    attrs = read_feature_attrs(job.out_path)
    made = (attrs.get("encoder"), attrs.get("weights"))
    if made != (encoder, weights):
        return (f"{job.out_path} already holds features from encoder {made[0]} with weights {made[1]} "
                f"(fix: write to another --out folder, or delete the file to replace it)")
    return None


def plan_jobs(entries: Sequence[SlideEntry], coords_dir: Path, out_dir: Path, *, encoder: str,
              weights: str) -> tuple[list[SlideJob], list[SlideOutcome]]:
    """Jobs still to run, and outcomes decided up front (skipped complete outputs, recorded failures)."""
    jobs: list[SlideJob] = []
    decided: list[SlideOutcome] = []
    seen: set[str] = set()
    for entry in entries:
        slide_id = entry.slide_id
        out_path = features_path(out_dir, slide_id)
        try:
            if not slide_id or Path(slide_id).name != slide_id or slide_id in {".", ".."}:
                raise DataError(f"slide id {slide_id!r} is not a plain file name", path=entry.path,
                                hint="slide ids name output files; use ids without / or ..")
            if slide_id in seen:
                raise DataError(f"slide id {slide_id!r} appears twice", path=entry.path,
                                hint="give every slide a unique slide_id")
            seen.add(slide_id)
            coords_path = coords_dir / f"{slide_id}.h5"
            num_patches = _count_coords(coords_path)
            if num_patches == 0:
                raise DataError("coordinates file holds no patches (no tissue found?)", path=coords_path,
                                hint="check the tiling of this slide (e.g. a lower --tissue-threshold)")
            job = SlideJob(slide_id, entry.path, coords_path, out_path, num_patches, entry.mpp_override)
            if is_complete(out_path, num_patches):
                conflict = _existing_output_conflict(job, encoder, weights)
                decided.append(SlideOutcome(slide_id, "failed", num_patches, out_path, error=conflict) if conflict
                               else SlideOutcome(slide_id, "skipped", num_patches, out_path))
                continue
        except MambascopeError as exc:
            decided.append(SlideOutcome(slide_id, "failed", out_path=out_path, error=exc.one_line()))
            continue
        jobs.append(job)
    return jobs, decided


def write_status_csv(outcomes: Iterable[SlideOutcome], path: str | Path) -> Path:
    """One row per slide: slide_id, status, num_patches, zero_filled, seconds, features_path, error."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "status", "num_patches", "zero_filled", "seconds", "features_path", "error"])
        for o in sorted(outcomes, key=lambda o: o.slide_id):
            writer.writerow([o.slide_id, o.status, o.num_patches, o.zero_filled, f"{o.seconds:.2f}",
                             "" if o.out_path is None or o.status == "failed" else str(o.out_path), o.error])
    return path
