"""Streaming extraction: patch chunks from DataLoader workers -> device preprocessing -> encoder -> HDF5.

The workers ship uint8 pixels; resizing to the encoder's input, scaling and normalisation happen on the
device (channels-last, autocast for bf16/fp16, optionally `torch.compile`). Features are copied back
asynchronously and written into the slide's features file as each batch finishes, so memory stays flat
however many patches a slide has. Each slide's file appears atomically when its last row is written; a
failing slide is recorded and the rest go on.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import mambascope
from mambascope.errors import ConfigError, MambascopeError
from mambascope.features.backbones import Backbone
from mambascope.features.jobs import SlideJob, SlideOutcome, plan_jobs, resolve_coords_dir, write_status_csv
from mambascope.features.patch_reader import PatchChunks
from mambascope.features.sharding import Shard, select_shard
from mambascope.features.store import open_feature_writer
from mambascope.slides.coords_store import read_coords

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class ExtractionSettings:
    """How to run the encoder; none of these change which slides are processed."""

    batch_size: int = 256
    workers: int = 4
    precision: str = "fp32"
    compile: bool = False
    device: str = "auto"
    zero_fill_unreadable: bool = False
    feature_dtype: str = "float32"
    slide_backend: str = "auto"
    prefetch_factor: int = 2

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}", hint=f"use one of {', '.join(PRECISIONS)}")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ConfigError(f"unknown feature dtype {self.feature_dtype!r}", hint="use float32 or float16")
        if self.batch_size < 1 or self.workers < 0 or self.prefetch_factor < 1:
            raise ConfigError("batch size and prefetch factor must be >= 1 and workers >= 0",
                              hint="e.g. --batch-size 256 --workers 8")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` -> this rank's GPU if there is one, else CPU; `cuda` -> this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda asked for but no CUDA GPU is available",
                              hint="use --device cpu (or auto)")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


class PatchEncoder:
    """uint8 patches (B, H, W, 3) -> features (B, D) on the device, with the backbone's preprocessing."""

    def __init__(self, backbone: Backbone, device: torch.device, *, precision: str = "fp32",
                 compile: bool = False, batch_size: int | None = None, out_dtype: torch.dtype = torch.float32):
        self.backbone = backbone
        self.device = device
        self.autocast_dtype = PRECISIONS[precision]
        self.out_dtype = out_dtype
        #: with torch.compile, short batches are padded to this size so one graph serves every batch
        self.fixed_batch = batch_size if compile else None
        module = backbone.module.eval().to(device=device, memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.model = torch.compile(module) if compile else module
        shape = (1, 3, 1, 1)
        self._shift = torch.tensor([255.0 * m for m in backbone.mean], device=device).view(shape)
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in backbone.std], device=device).view(shape)
        #: uploads run on their own stream so the next batch's copy overlaps this batch's compute
        self._upload_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def upload(self, pixels: torch.Tensor) -> torch.Tensor:
        """Host uint8 batch -> device; on CUDA the copy runs on a side stream the compute waits for."""
        if self._upload_stream is None:
            return pixels.to(self.device)
        with torch.cuda.stream(self._upload_stream):
            on_device = pixels.to(self.device, non_blocking=True)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self._upload_stream)
        on_device.record_stream(compute)  # the caching allocator must not reuse it before compute is done
        return on_device

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalised float (B, 3, S, S), channels-last, on the device."""
        x = self.upload(pixels).permute(0, 3, 1, 2).float()
        size = self.backbone.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode=self.backbone.interpolation, antialias=True,
                              align_corners=False)
        x = (x - self._shift) * self._scale
        return x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def forward_normalised(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder on already normalised input (what the benchmark's ceiling measures)."""
        count = x.shape[0]
        if self.fixed_batch is not None and count < self.fixed_batch:
            x = torch.cat([x, x.new_zeros((self.fixed_batch - count, *x.shape[1:]))])
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            features = self.model(x)
        return features[:count].to(self.out_dtype)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_normalised(self.preprocess(pixels))


class _HostCopy:
    """Device -> host copy that does not wait for later GPU work (pinned buffer + CUDA event)."""

    def __init__(self, tensor: torch.Tensor):
        self._event = None
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor

    def numpy(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()


class _OpenOutput:
    """A slide's features file being filled; `finish` renames it into place, `abort` deletes it."""

    def __init__(self, job: SlideJob, attrs: Mapping[str, Any], feature_dim: int, dtype: str):
        coords, coords_attrs = read_coords(job.coords_path)
        self._stack = ExitStack()
        self.writer = self._stack.enter_context(open_feature_writer(
            job.out_path, coords=coords, feature_dim=feature_dim, dtype=dtype, slide_id=job.slide_id,
            coords_attrs={k: v for k, v in coords_attrs.items() if v is not None},
            attrs={**attrs, "slide_file": job.slide_path.name}))
        self.rows_written = 0
        self.zero_filled = 0

    def write(self, start: int, block: np.ndarray, zero_rows: np.ndarray) -> None:
        if zero_rows.size:
            block[zero_rows - start] = 0
            self.writer.mark_zero_filled(zero_rows)
            self.zero_filled += int(zero_rows.size)
        self.writer.write(start, block)
        self.rows_written += int(block.shape[0])

    def finish(self) -> None:
        self._stack.close()

    def abort(self) -> None:
        self._stack.__exit__(RuntimeError, RuntimeError("slide failed"), None)


def feature_file_attrs(backbone: Backbone, settings: ExtractionSettings) -> dict[str, Any]:
    """Provenance written on every features file."""
    return {"encoder": backbone.name, "timm_model": backbone.timm_name, "weights": backbone.weights,
            "init_seed": backbone.init_seed, "precision": settings.precision,
            "transform": backbone.transform_attrs(), "zero_fill_unreadable": settings.zero_fill_unreadable,
            "mambascope_version": mambascope.__version__}


def _progress(show: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), disable=not show)


def extract_slides(jobs: Sequence[SlideJob], backbone: Backbone, settings: ExtractionSettings = ExtractionSettings(),
                   *, local_rank: int = 0, show_progress: bool = True) -> list[SlideOutcome]:
    """Encode every patch of `jobs` with one DataLoader streaming across the slides; one outcome per job."""
    from torch.utils.data import DataLoader

    if not jobs:
        return []
    jobs = list(jobs)
    device = resolve_device(settings.device, local_rank)
    encoder = PatchEncoder(backbone, device, precision=settings.precision, compile=settings.compile,
                           batch_size=settings.batch_size, out_dtype=FEATURE_DTYPES[settings.feature_dtype])
    attrs = feature_file_attrs(backbone, settings)
    dataset = PatchChunks(jobs, settings.batch_size, zero_fill_unreadable=settings.zero_fill_unreadable,
                          slide_backend=settings.slide_backend)
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=settings.workers,
                        pin_memory=device.type == "cuda",
                        prefetch_factor=settings.prefetch_factor if settings.workers else None)
    outputs: dict[int, _OpenOutput] = {}
    outcomes: dict[int, SlideOutcome] = {}
    started: dict[int, float] = {}
    pending: list[tuple[int, int, _HostCopy, np.ndarray]] = []

    def elapsed(j: int) -> float:
        return time.perf_counter() - started.get(j, time.perf_counter())

    def fail(j: int, error: str) -> None:
        output = outputs.pop(j, None)
        if output is not None:
            output.abort()
        job = jobs[j]
        outcomes[j] = SlideOutcome(job.slide_id, "failed", job.num_patches, job.out_path, error=error,
                                   seconds=elapsed(j))

    def flush_oldest() -> None:
        j, start, copy, zero_rows = pending.pop(0)
        output = outputs.get(j)
        if output is None:  # the slide failed after this batch was queued
            return
        output.write(start, copy.numpy(), zero_rows)
        job = jobs[j]
        if output.rows_written == job.num_patches:
            del outputs[j]
            output.finish()
            outcomes[j] = SlideOutcome(job.slide_id, "done", job.num_patches, job.out_path,
                                       seconds=elapsed(j), zero_filled=output.zero_filled)

    total = sum(job.num_patches for job in jobs)
    clock, seen = time.perf_counter(), 0
    try:
        with _progress(show_progress) as progress:
            task = progress.add_task("features", total=total, rate="")
            for item in loader:
                j, start = int(item["job"]), int(item["start"])
                job = jobs[j]
                started.setdefault(j, time.perf_counter())
                count = min(settings.batch_size, job.num_patches - start)
                if j not in outcomes:
                    if item["error"]:
                        fail(j, item["error"])
                    else:
                        if j not in outputs:
                            try:
                                outputs[j] = _OpenOutput(job, attrs, backbone.feature_dim, settings.feature_dtype)
                            except MambascopeError as exc:
                                fail(j, exc.one_line())
                        if j in outputs:
                            features = encoder(item["pixels"])
                            pending.append((j, start, _HostCopy(features), item["zero_filled"].numpy()))
                            if len(pending) > 1:  # write batch k-1 while the device runs batch k
                                flush_oldest()
                seen += count
                rate = seen / max(time.perf_counter() - clock, 1e-9)
                progress.update(task, advance=count, description=job.slide_id, rate=f"{rate:.0f} patches/s")
            while pending:
                flush_oldest()
    finally:
        for output in outputs.values():
            output.abort()
        dataset.close()
    return [outcomes[j] for j in range(len(jobs))]


@dataclass
class ExtractionReport:
    """Outcome of `extract_features`: per-slide outcomes, this process's shard, where things were written."""

    outcomes: list[SlideOutcome]
    shard: Shard
    out_dir: Path
    status_csv: Path
    backbone: str
    weights: str
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def extract_features(slides: str | Path, coords: str | Path, out_dir: str | Path, backbone: Backbone,
                     settings: ExtractionSettings = ExtractionSettings(), *, shard: Shard = Shard(),
                     local_rank: int = 0, show_progress: bool = True) -> ExtractionReport:
    """Features for this shard's slides: `<out_dir>/<slide_id>.h5`, plus a status CSV of every slide.

    `slides` is a folder or CSV (as for `mambascope tile`), `coords` the tiling output folder (or its
    `coords/`). Complete outputs from an earlier run are skipped; failures are recorded, not raised.
    """
    from mambascope.slides.reader import list_slides

    clock = time.perf_counter()
    out_dir = Path(out_dir)
    entries = select_shard(list_slides(slides), shard, key=lambda e: e.slide_id)
    jobs, decided = plan_jobs(entries, resolve_coords_dir(coords), out_dir, encoder=backbone.name,
                              weights=backbone.weights)
    outcomes = decided + extract_slides(jobs, backbone, settings, local_rank=local_rank, show_progress=show_progress)
    outcomes.sort(key=lambda o: o.slide_id)
    status_csv = write_status_csv(outcomes, out_dir / f"features_status{shard.tag}.csv")
    counts = {status: sum(o.status == status for o in outcomes) for status in ("done", "skipped", "failed")}
    return ExtractionReport(outcomes, shard, out_dir, status_csv, backbone.name, backbone.weights,
                            seconds=time.perf_counter() - clock, counts=counts)
