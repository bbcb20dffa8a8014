"""Tiling throughput: seconds per slide and slides per second, coordinates only and with patch pixels.

Slides: a generated 3-level pyramidal TIFF (default 51200 x 51200, 0.25 µm/px, JPEG tiles cut from the
real CMU-1 SVS inside an elliptical "tissue" region, glass elsewhere) and the real CMU-1-Small-Region SVS.
Ratios are printed against the target (coordinates for a 50k x 50k slide in under 10 s) and against a
floor: the time to only read the same patches with OpenSlide, without tissue detection or writing.

    .venv/bin/python benchmarks/tiling.py [--size 51200] [--work-dir /tmp/mambascope-bench]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from mambascope.sample_data import sample_path
from mambascope.slides import SlideEntry, TilingConfig, open_slide, read_coords, tile_slides

TILE = 512
TARGET_COORDS_SECONDS = 10.0


def _real_tiles(count: int = 6) -> list[np.ndarray]:
    """Tissue-rich 512 x 512 tiles from the real SVS (most saturated first)."""
    import cv2

    with open_slide(sample_path("CMU-1-Small-Region.svs")) as slide:
        pixels = slide.read_region((0, 0), 0, slide.dimensions)
    candidates = [pixels[y:y + TILE, x:x + TILE] for y in range(0, pixels.shape[0] - TILE, TILE)
                  for x in range(0, pixels.shape[1] - TILE, TILE)]
    saturation = [cv2.cvtColor(t, cv2.COLOR_RGB2HSV)[..., 1].mean() for t in candidates]
    return [np.ascontiguousarray(candidates[i]) for i in np.argsort(saturation)[::-1][:count]]


def write_large_pyramid(path: Path, size: int, mpp: float = 0.25, levels: int = 3, factor: int = 4) -> Path:
    """A `size` x `size` pyramidal TIFF written tile by tile (bounded memory, a minute or so)."""
    import tifffile

    tiles = _real_tiles()
    glass = np.full((TILE, TILE, 3), 243, np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(levels):
            downsample = factor**level
            side = size // downsample
            grid = -(-side // TILE)

            def level_tiles(grid: int = grid, downsample: int = downsample):
                for row in range(grid):
                    for col in range(grid):
                        # tile centre in level-0 units, relative to the slide centre, in half-sizes
                        cx = ((col + 0.5) * TILE * downsample - size / 2) / (size * 0.42)
                        cy = ((row + 0.5) * TILE * downsample - size / 2) / (size * 0.30)
                        yield tiles[(row * 7 + col * 3) % len(tiles)] if cx * cx + cy * cy <= 1 else glass

            level_mpp = mpp * downsample
            tif.write(level_tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                      compression="jpeg", subfiletype=0 if level == 0 else 1,
                      resolution=(1e4 / level_mpp, 1e4 / level_mpp), resolutionunit="CENTIMETER")
    return path


def _cpu_seconds() -> float:
    """CPU time of this process and its finished workers (the machine may be shared: wall time is noisy)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _time_tiling(entries: list[SlideEntry], out: Path, config: TilingConfig,
                 workers: int = 1) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and patch count of one tiling run from scratch."""
    shutil.rmtree(out, ignore_errors=True)
    start, cpu = time.perf_counter(), _cpu_seconds()
    report = tile_slides(entries, out, config, workers=workers)
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    failed = report.failed
    if failed:
        raise SystemExit(f"tiling failed: {failed[0].error}")
    return elapsed, cpu, sum(r.num_patches or 0 for r in report.results)


def _time_plain_reads(path: Path, coords_file: Path, limit: int) -> tuple[float, int]:
    """The floor: read (and resize) the same patches with nothing else, up to `limit` of them."""
    coords, attrs = read_coords(coords_file)
    coords = coords[:limit]
    with open_slide(path) as slide:
        start = time.perf_counter()
        for x, y in coords:
            slide.read_patch((int(x), int(y)), attrs["patch_size_level0"], attrs["patch_size"])
        return time.perf_counter() - start, len(coords)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=51200, help="side of the generated slide in pixels")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mambascope-bench-tiling"))
    parser.add_argument("--svs-copies", type=int, default=8, help="SVS copies for the batch (slides/s) runs")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)

    large = args.work_dir / f"generated-{args.size}.tiff"
    if not large.is_file():
        start = time.perf_counter()
        write_large_pyramid(large, args.size)
        print(f"wrote {large.name} ({large.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s")
    with open_slide(large) as slide:
        print(f"generated slide: {slide.dimensions[0]} x {slide.dimensions[1]}, {slide.level_count} levels, "
              f"mpp {slide.mpp}, reader {slide.reader}")

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall times stretch when it is high)")
    config = TilingConfig(patch_size=256, magnification=20)
    rows = []
    large_entry = [SlideEntry("generated", large)]
    seconds, cpu, patches = _time_tiling(large_entry, args.work_dir / "out-large", config)
    rows.append(("generated, coordinates", seconds, cpu, patches, 1))
    print(f"coordinates for the {args.size // 1000}k slide: {seconds:.2f} s wall, {cpu:.2f} s CPU ({patches} "
          f"patches); target {TARGET_COORDS_SECONDS:.0f} s -> {seconds / TARGET_COORDS_SECONDS:.2f} of the budget")
    seconds_px, cpu_px, patches_px = _time_tiling(large_entry, args.work_dir / "out-large-px",
                                                  TilingConfig(patch_size=256, magnification=20, save_patches=True))
    rows.append(("generated, with pixels", seconds_px, cpu_px, patches_px, 1))
    floor, read = _time_plain_reads(large, args.work_dir / "out-large" / "coords" / "generated.h5", 2000)
    floor_per_patch = floor / read
    print(f"with pixels: {seconds_px:.1f} s = {seconds_px / patches_px * 1e3:.2f} ms/patch; plain OpenSlide reads "
          f"{floor_per_patch * 1e3:.2f} ms/patch -> {seconds_px / patches_px / floor_per_patch:.2f}x the read floor")

    svs = sample_path("CMU-1-Small-Region.svs")
    copies = args.work_dir / "svs-copies"
    copies.mkdir(exist_ok=True)
    entries = []
    for index in range(args.svs_copies):
        copy = copies / f"svs-{index}.svs"
        if not copy.exists():
            shutil.copy(svs, copy)
        entries.append(SlideEntry(copy.stem, copy))
    batch_seconds = {}
    for label, cfg in (("coordinates", config), ("with pixels", TilingConfig(patch_size=256, save_patches=True))):
        one, cpu_one, patches_one = _time_tiling(entries[:1], args.work_dir / "out-svs", cfg)
        rows.append((f"SVS, {label}", one, cpu_one, patches_one, 1))
        for workers in (1, 2):
            batch, cpu_batch, patches_batch = _time_tiling(entries, args.work_dir / f"out-svs-batch{workers}", cfg,
                                                           workers=workers)
            rows.append((f"{len(entries)} x SVS, {label}, {workers} worker(s)", batch, cpu_batch, patches_batch,
                         len(entries)))
            batch_seconds[label, workers] = batch

    print(f"\n{'run':<42} {'wall s':>8} {'CPU s':>7} {'s/slide':>8} {'slides/s':>9} {'patches':>8}")
    for label, seconds, cpu, count, slides in rows:
        print(f"{label:<42} {seconds:>8.2f} {cpu:>7.2f} {seconds / slides:>8.3f} {slides / seconds:>9.2f} {count:>8}")
    for label in ("coordinates", "with pixels"):
        speedup = batch_seconds[label, 1] / batch_seconds[label, 2]
        print(f"SVS batch, {label}: 2 workers are {speedup:.2f}x the speed of 1")

if __name__ == "__main__":
    main()
