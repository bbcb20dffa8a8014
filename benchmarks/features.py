"""Patch feature extraction throughput: end to end from a real slide vs the encoder alone.

For each backbone this measures, in patches per second:

- ceiling: the encoder (same batch size, precision, channels-last, compile setting) on random, already
  normalised tensors that live on the device: the best any pipeline could do;
- loader: the DataLoader workers reading patches from the slides, without the encoder;
- end to end: `extract_features` from slide + coordinates files to features HDF5 files on disk
  (reading, host->device copy, resize + normalisation on the device, encoder, writing).

and prints end-to-end / ceiling. The slide is made of real pixels: the bundled Aperio SVS
(CMU-1-Small-Region, 20x) laid out 3 x 3 and written as a JPEG-tiled pyramidal TIFF with 240-pixel
tiles like Aperio's (6660 x 8901 px), so tiles are decoded for real rather than served from a reader
cache that would hold the whole small original. Each slide is tiled with a non-overlapping 256-pixel
grid (884 patches) and linked under several names so the run streams across many slides as a real
batch does. Weights are random (`none`): speed does not depend on them and nothing is downloaded.

    python benchmarks/features.py --device cuda                       # GPU defaults: bf16, batch 256
    python benchmarks/features.py --device cpu --patches 64 --batch-size 16 --workers 1   # tiny CPU run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mambascope.features.backbones import create_backbone
from mambascope.features.jobs import plan_jobs, resolve_coords_dir
from mambascope.features.patch_reader import PatchChunks
from mambascope.features.pipeline import ExtractionSettings, PatchEncoder, extract_features, resolve_device
from mambascope.sample_data import sample_path
from mambascope.slides.coords_store import write_coords
from mambascope.slides.reader import list_slides, open_slide

PATCH, MOSAIC = 256, 3


def make_slide(path: Path) -> Path:
    """A pyramidal JPEG TIFF of real H&E pixels: the bundled SVS repeated MOSAIC x MOSAIC times."""
    from mambascope.slides.pyramid_tiff import write_pyramidal_tiff

    with open_slide(sample_path("CMU-1-Small-Region.svs")) as slide:
        rgb = slide.read_region((0, 0), 0, slide.dimensions)
        mpp = slide.mpp
    return write_pyramidal_tiff(path, np.tile(rgb, (MOSAIC, MOSAIC, 1)), mpp, tile=240)


def build_slides(root: Path, source: Path, total_patches: int) -> tuple[Path, Path, int]:
    """Links to `source` plus coords files, enough slides for `total_patches`; returns (slides, tiles, N)."""
    with open_slide(source) as slide:
        width, height = slide.dimensions
    xs, ys = np.arange(0, width - PATCH + 1, PATCH), np.arange(0, height - PATCH + 1, PATCH)
    cells = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2).astype(np.int64)
    slides, tiles = root / "slides", root / "tiles"
    slides.mkdir(parents=True)
    count, remaining = 0, total_patches
    while remaining > 0:
        coords = cells[:remaining]
        link = slides / f"slide{count:04d}.tif"
        link.symlink_to(source)
        with open_slide(link) as slide:
            attrs = {"patch_size": PATCH, "patch_size_level0": PATCH, "patch_level": 0,
                     "level0_width": width, "level0_height": height, "reader": slide.reader,
                     "slide_fingerprint": slide.fingerprint()}
        write_coords(tiles / "coords" / f"{link.stem}.h5", coords, attrs)
        remaining -= len(coords)
        count += 1
    return slides, tiles, total_patches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceiling(encoder: PatchEncoder, batch_size: int, batches: int) -> float:
    """Patches/s of the encoder alone on random normalised input already on the device."""
    size = encoder.backbone.input_size
    x = torch.randn(batch_size, 3, size, size, device=encoder.device).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        encoder.forward_normalised(x)
    _sync(encoder.device)
    start = time.perf_counter()
    for _ in range(batches):
        encoder.forward_normalised(x)
    _sync(encoder.device)
    return batches * batch_size / (time.perf_counter() - start)


def loader_only(slides: Path, tiles: Path, settings: ExtractionSettings) -> float:
    """Patches/s the DataLoader workers deliver from the slides, without any encoder."""
    from torch.utils.data import DataLoader

    # an output folder that does not exist, so no slide counts as done
    jobs, _ = plan_jobs(list_slides(slides), resolve_coords_dir(tiles), tiles / "no-outputs", encoder="",
                        weights="")
    loader = DataLoader(PatchChunks(jobs, settings.batch_size), batch_size=None, num_workers=settings.workers,
                        prefetch_factor=settings.prefetch_factor if settings.workers else None)
    start, seen = time.perf_counter(), 0
    for item in loader:
        seen += item["pixels"].shape[0]
    return seen / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 2)
    settings = ExtractionSettings(batch_size=args.batch_size, workers=workers, precision=precision,
                                  compile=args.compile, device=str(device))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = make_slide(root / "mosaic.tif")
        slides, tiles, total = build_slides(root / "data", source, args.patches)
        warm_slides, warm_tiles, _ = build_slides(root / "warm", source, min(args.patches, 2 * args.batch_size))
        for name in args.backbones:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                backbone = create_backbone(name, "none")
            # warm-up end to end (CUDA context, cuDNN autotuning, torch.compile) on a separate small set
            extract_features(warm_slides, warm_tiles, root / f"warm_{name}", backbone, settings, show_progress=False)
            _sync(device)
            start = time.perf_counter()
            report = extract_features(slides, tiles, root / f"out_{name}", backbone, settings,
                                      show_progress=False)
            _sync(device)
            end_to_end = total / (time.perf_counter() - start)
            if report.failed:
                raise RuntimeError(f"benchmark slides failed: {report.failed[0].error}")
            encoder = PatchEncoder(backbone, device, precision=precision, compile=args.compile,
                                   batch_size=args.batch_size)
            top = ceiling(encoder, args.batch_size, args.ceiling_batches)
            reading = loader_only(slides, tiles, settings)
            results.append({"backbone": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu", "precision": precision, "batch_size": args.batch_size, "workers": workers,
                            "compile": args.compile, "patches": total, "slides": report.counts["done"],
                            "end_to_end_per_s": round(end_to_end, 1), "ceiling_per_s": round(top, 1),
                            "loader_only_per_s": round(reading, 1), "ratio": round(end_to_end / top, 3)})
            print(f"{name:>15}: end to end {end_to_end:9.1f} patches/s | ceiling {top:9.1f} | "
                  f"loader only {reading:9.1f} | end-to-end / ceiling = {end_to_end / top:.2f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--backbones", nargs="+", default=["resnet50-trunc", "vit_b16"])
    parser.add_argument("--patches", type=int, default=50000, help="patches encoded end to end per backbone")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: CPU cores - 2)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    parser.add_argument("--ceiling-batches", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    results = run(args)
    for row in results:
        if row["backbone"] == "vit_b16":
            print(f"vit_b16 target end-to-end >= 0.80 x ceiling: {'met' if row['ratio'] >= 0.8 else 'NOT met'} "
                  f"({row['ratio']:.2f})")
        if row["backbone"] == "resnet50-trunc":
            print(f"resnet50-trunc target >= 5000 patches/s end to end: "
                  f"{'met' if row['end_to_end_per_s'] >= 5000 else 'NOT met'} ({row['end_to_end_per_s']:.0f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
