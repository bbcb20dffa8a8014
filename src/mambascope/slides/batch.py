"""Tile many slides: one process per slide in parallel, a progress bar, failures recorded per slide, and
`processed_metadata.csv` with one row per slide."""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mambascope.atomic import atomic_path
from mambascope.slides.reader import SlideEntry, list_slides
from mambascope.slides.tiling import SlideResult, TilingConfig, tile_slide_recorded

METADATA_NAME = "processed_metadata.csv"


@dataclass(frozen=True)
class TilingReport:
    """What a batch did: one result per slide (input order) and where the metadata table is."""

    results: list[SlideResult]
    metadata_path: Path

    @property
    def failed(self) -> list[SlideResult]:
        return [r for r in self.results if r.status == "failed"]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)


def _duplicate_failures(entries: list[SlideEntry]) -> dict[int, SlideResult]:
    """Entries whose slide id was already used by an earlier entry (their outputs would collide)."""
    seen: dict[str, SlideEntry] = {}
    failures = {}
    for index, entry in enumerate(entries):
        first = seen.setdefault(entry.slide_id, entry)
        if first is not entry:
            failures[index] = SlideResult(entry.slide_id, str(entry.path), "failed", extra=dict(entry.extra),
                                          error=f"duplicate slide id {entry.slide_id!r} (also {first.path}); "
                                                f"give each slide a unique slide_id in the CSV")
    return failures


def _run_parallel(todo: dict[int, SlideEntry], out_dir: Path, config: TilingConfig, overwrite: bool,
                  workers: int, on_done: Callable[[int, SlideResult], None]) -> None:
    """Each slide in a worker process (its own slide handle). If a worker dies (a library crashing on a
    corrupt file), the unfinished slides are retried one process each, so only the culprit fails."""
    context = multiprocessing.get_context("spawn")
    remaining = dict(todo)
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        submitted = {pool.submit(tile_slide_recorded, entry, out_dir, config, overwrite): index
                     for index, entry in remaining.items()}
        for future in futures.as_completed(submitted):
            index = submitted[future]
            try:
                result = future.result()
            except futures.process.BrokenProcessPool:
                continue
            remaining.pop(index)
            on_done(index, result)
    for index, entry in remaining.items():
        with futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            try:
                result = pool.submit(tile_slide_recorded, entry, out_dir, config, overwrite).result()
            except futures.process.BrokenProcessPool:
                result = SlideResult(entry.slide_id, str(entry.path), "failed", extra=dict(entry.extra),
                                     error="the slide library crashed the worker process while reading this "
                                           "file (corrupt file?)")
        on_done(index, result)


def write_metadata(path: Path, results: Iterable[SlideResult]) -> Path:
    """`processed_metadata.csv`: input columns, then num_patches, mpp, magnification, status, error."""
    import pandas as pd

    table = pd.DataFrame([r.row() for r in results])
    for column in ("num_patches", "patch_size_level0"):
        table[column] = table[column].astype("Int64")
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path


def tile_slides(slides: str | Path | list[SlideEntry], out_dir: str | Path, config: TilingConfig | None = None,
                *, workers: int = 1, overwrite: bool = False, show_progress: bool = False) -> TilingReport:
    """Tile every slide of a folder, CSV or entry list into `out_dir`; never raises for one bad slide.

    Complete outputs made with the same settings are skipped (resume); broken or stale ones are redone.
    Check `report.failed`: the CLI exits non-zero when it is not empty.
    """
    config = config or TilingConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = list_slides(slides) if isinstance(slides, (str, Path)) else list(slides)
    results: dict[int, SlideResult] = _duplicate_failures(entries)
    todo = {i: e for i, e in enumerate(entries) if i not in results}

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("tiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), disable=not show_progress, transient=False) as progress:
        task = progress.add_task("", total=len(entries), completed=len(results))

        def on_done(index: int, result: SlideResult) -> None:
            results[index] = result
            progress.update(task, advance=1, description=f"{result.slide_id}: {result.status}")

        if workers <= 1 or len(todo) <= 1:
            for index, entry in todo.items():
                on_done(index, tile_slide_recorded(entry, out_dir, config, overwrite))
        else:
            _run_parallel(todo, out_dir, config, overwrite, min(workers, len(todo)), on_done)
    ordered = [results[i] for i in range(len(entries))]
    metadata = write_metadata(out_dir / METADATA_NAME, ordered)
    return TilingReport(ordered, metadata)
