"""Heatmap rendering: time and peak memory for many patches, against the per-patch painting loop.

A slide of `--patches` patches (default 100,000, 512 level-0 pixels each, random positions on a
160k x 90k slide) is rendered on a `--thumbnail`-pixel canvas by `render_heatmap` (2D difference
array, vectorised) and by the usual loop that paints each patch's rectangle into sum/count canvases
at thumbnail scale. Prints seconds and traced peak memory of each, the speed ratio, and the peak
against the budget of "a few hundred MB" (300 MB).

    .venv/bin/python benchmarks/heatmaps.py [--patches 100000] [--thumbnail 2048]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from mambascope.eval.heatmaps import blend_heatmap, patch_boxes, rank_normalise, render_heatmap

BUDGET_MB = 300.0


def loop_render(scores, coords, size0, thumbnail, level0):
    """Reference: paint each patch's rectangle one by one (same boxes, same blend)."""
    h, w = thumbnail.shape[:2]
    total = np.zeros((h, w), dtype=np.float64)
    count = np.zeros((h, w), dtype=np.int32)
    for (x0, y0, x1, y1), value in zip(patch_boxes(coords, size0, level0, (w, h)), rank_normalise(scores),
                                       strict=True):
        total[y0:y1, x0:x1] += value
        count[y0:y1, x0:x1] += 1
    covered = count > 0
    mean = np.zeros((h, w), dtype=np.float32)
    mean[covered] = total[covered] / count[covered]
    return blend_heatmap(thumbnail, mean, covered)


def measure(fn, *args):
    """(output, best of 3 seconds untraced, traced peak MB of one more call)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    fn(*args)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, min(times), peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=100_000)
    parser.add_argument("--thumbnail", type=int, default=2048)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    level0 = (160_000, 90_000)
    size0 = 512
    coords = np.stack([rng.integers(0, level0[0] - size0, args.patches),
                       rng.integers(0, level0[1] - size0, args.patches)], axis=1)
    scores = rng.random(args.patches).astype(np.float32)
    thumb_h = round(args.thumbnail * level0[1] / level0[0])
    thumbnail = np.full((thumb_h, args.thumbnail, 3), 230, dtype=np.uint8)

    fast, fast_s, fast_mb = measure(render_heatmap, scores, coords, size0, thumbnail, level0)
    slow, slow_s, slow_mb = measure(loop_render, scores, coords, size0, thumbnail, level0)
    same = np.abs(fast.astype(int) - slow.astype(int)).max() <= 1
    print(f"{args.patches} patches on a {args.thumbnail}x{thumb_h} canvas")
    print(f"render_heatmap (difference array): {fast_s:.3f} s, peak {fast_mb:.0f} MB")
    print(f"per-patch loop (reference):        {slow_s:.3f} s, peak {slow_mb:.0f} MB")
    print(f"speed-up vs loop: {slow_s / fast_s:.1f}x; same picture: {same}")
    print(f"peak memory / {BUDGET_MB:.0f} MB budget: {fast_mb / BUDGET_MB:.2f}")


if __name__ == "__main__":
    main()
