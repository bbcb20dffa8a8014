"""Read patches for the encoder inside DataLoader workers: one slide handle per worker, uint8 out.

The work of all slides is cut into chunks of `batch_size` consecutive patches of one slide; a single
DataLoader over those chunks streams across slides (no pool restart per slide) and hands them back in
order. A chunk that cannot be read comes back with an error text instead of raising, so one bad slide
fails alone while the workers go on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from mambascope.errors import DataError, MambascopeError, SlideReadError
from mambascope.features.jobs import SlideJob
from mambascope.slides.coords_store import read_coords
from mambascope.slides.reader import Slide, open_slide


def check_coords_match_slide(slide: Slide, attrs: Mapping[str, Any], coords_path: Path) -> None:
    """Refuse coordinates made from another file: fingerprint first, else level-0 size (CLAM/TRIDENT files)."""
    recorded = attrs.get("slide_fingerprint")
    if recorded:
        actual = slide.fingerprint()
        if str(recorded) != actual:
            raise DataError(f"coordinates were made from a different file than slide {slide.path} "
                            f"(fingerprint {recorded} in the coords file, {actual} for the slide)", path=coords_path,
                            hint="pair each slide with its own coords (same slide_id), or rerun `mambascope tile`")
    width, height = attrs.get("level0_width"), attrs.get("level0_height")
    if width is not None and height is not None and (int(width), int(height)) != tuple(slide.dimensions):
        raise DataError(f"coordinates are for a {width}x{height} slide but {slide.path} is "
                        f"{slide.dimensions[0]}x{slide.dimensions[1]}", path=coords_path,
                        hint="pair each slide with its own coords (same slide_id), or rerun `mambascope tile`")


def patch_geometry(slide: Slide, attrs: Mapping[str, Any], coords_path: Path) -> tuple[int, int]:
    """(side in level-0 pixels, side in output pixels) of each patch from the coords attrs.

    Our and TRIDENT files give `patch_size_level0`; CLAM files give `patch_size` at `patch_level`.
    """
    patch_size = attrs.get("patch_size")
    if patch_size is None or int(patch_size) <= 0:
        raise DataError("coordinates file lacks a positive `patch_size` attribute", path=coords_path,
                        hint="rerun `mambascope tile`, or add patch_size (and patch_size_level0) attrs")
    size_level0 = attrs.get("patch_size_level0")
    if size_level0 is None:
        level = int(attrs.get("patch_level") or 0)
        if not 0 <= level < slide.level_count:
            raise DataError(f"patch_level {level} does not exist in the slide ({slide.level_count} levels)",
                            path=coords_path, hint="pair each slide with its own coords")
        size_level0 = round(int(patch_size) * slide.level_downsamples[level])
    return int(size_level0), int(patch_size)


def _batch_buffer(shape: tuple[int, ...], *, shared: bool) -> torch.Tensor:
    """An uninitialised uint8 tensor, in shared memory for a worker: filled in place, handing it to
    the main process copies nothing. Allocated there directly (as torch's own collate does), because
    `share_memory_` would first copy the whole fresh buffer."""
    if not shared:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


@dataclass
class _OpenSource:
    """A worker's handle on the slide it is reading now (or why that slide cannot be read)."""

    job_index: int
    slide: Slide | None = None
    coords: np.ndarray | None = None
    size_level0: int = 0
    out_size: int = 0
    error: str = ""

    def close(self) -> None:
        if self.slide is not None:
            self.slide.close()


def _open_source(job_index: int, job: SlideJob, backend: str) -> _OpenSource:
    source = _OpenSource(job_index)
    try:
        coords, attrs = read_coords(job.coords_path)
        if coords.shape[0] != job.num_patches:
            raise DataError(f"coordinates file changed during extraction ({coords.shape[0]} patches, "
                            f"planned {job.num_patches})", path=job.coords_path, hint="rerun the command")
        source.slide = open_slide(job.slide_path, backend=backend, mpp_override=job.mpp_override,
                                  slide_id=job.slide_id)
        check_coords_match_slide(source.slide, attrs, job.coords_path)
        source.size_level0, source.out_size = patch_geometry(source.slide, attrs, job.coords_path)
        source.coords = coords
    except Exception as exc:  # a library crashing on one strange file must fail that slide, not the pool
        source.close()
        source.slide = None
        source.error = exc.one_line() if isinstance(exc, MambascopeError) else (
            f"unexpected error opening {job.slide_path} ({type(exc).__name__}: {exc})")
    return source


class PatchChunks(Dataset):
    """Chunk `i` -> {job, start, pixels (n, S, S, 3) uint8, zero_filled (k,) rows, error}.

    With `zero_fill_unreadable`, a patch whose region cannot be read is returned as zeros and its
    row listed in `zero_filled`; otherwise the whole chunk carries the error and its slide fails.
    """

    def __init__(self, jobs: Sequence[SlideJob], batch_size: int, *, zero_fill_unreadable: bool = False,
                 slide_backend: str = "auto"):
        self.jobs = list(jobs)
        self.batch_size = int(batch_size)
        self.zero_fill_unreadable = zero_fill_unreadable
        self.slide_backend = slide_backend
        starts = [np.arange(0, job.num_patches, self.batch_size, dtype=np.int64) for job in self.jobs]
        self._unit_job = np.repeat(np.arange(len(starts), dtype=np.int64), [len(s) for s in starts])
        self._unit_start = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        self._source: _OpenSource | None = None

    def __len__(self) -> int:
        return int(self._unit_job.shape[0])

    def _source_for(self, job_index: int) -> _OpenSource:
        if self._source is None or self._source.job_index != job_index:
            self.close()
            self._source = _open_source(job_index, self.jobs[job_index], self.slide_backend)
        return self._source

    def close(self) -> None:
        """Close the slide handle this process holds (workers' handles close with the worker)."""
        if self._source is not None:
            self._source.close()
            self._source = None

    def _failed(self, item: dict[str, Any], error: str) -> dict[str, Any]:
        item["pixels"] = torch.zeros((0, 0, 0, 3), dtype=torch.uint8)
        item["error"] = error
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        job_index, start = int(self._unit_job[index]), int(self._unit_start[index])
        stop = min(start + self.batch_size, self.jobs[job_index].num_patches)
        item: dict[str, Any] = {"job": job_index, "start": start, "error": "",
                                "zero_filled": torch.zeros(0, dtype=torch.int64)}
        source = self._source_for(job_index)
        if source.error:
            return self._failed(item, source.error)
        size = source.out_size
        batch = _batch_buffer((stop - start, size, size, 3), shared=get_worker_info() is not None)
        pixels = batch.numpy()
        try:  # the fast path: tiles shared by neighbouring patches are decoded once
            source.slide.read_patches(source.coords[start:stop], source.size_level0, size, out=pixels)
        except SlideReadError:  # find the unreadable patches one by one, reading through the slide library
            self.close()  # an OpenSlide handle stays broken after one failed read: open a fresh one
            source = self._source_for(job_index)
            if source.error:
                return self._failed(item, source.error)
            return self._read_one_by_one(item, batch, source, start, stop)
        item["pixels"] = batch
        return item

    def _read_one_by_one(self, item: dict[str, Any], batch: torch.Tensor, source: _OpenSource, start: int,
                         stop: int) -> dict[str, Any]:
        """Per-patch reads that fail the chunk on an unreadable patch, or zero it when allowed."""
        job_index, size, pixels = item["job"], source.out_size, batch.numpy()
        unreadable = []
        for row, (x, y) in enumerate(source.coords[start:stop]):
            try:
                pixels[row] = source.slide.read_patch((int(x), int(y)), source.size_level0, size)
            except SlideReadError as exc:
                if not self.zero_fill_unreadable:
                    return self._failed(item, f"unreadable tile at level-0 ({x}, {y}), patch {start + row}: "
                                              f"{exc.one_line()} [use --zero-fill-unreadable to zero such tiles "
                                              "instead of failing the slide]")
                pixels[row] = 0
                unreadable.append(start + row)
                self.close()  # an OpenSlide handle stays broken after one failed read: open a fresh one
                source = self._source_for(job_index)
                if source.error:
                    return self._failed(item, source.error)
        item["pixels"] = batch
        item["zero_filled"] = torch.as_tensor(unreadable, dtype=torch.int64)
        return item
