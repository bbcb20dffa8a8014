"""Pictures that explain a slide-level prediction: attention heatmaps and top/bottom patch galleries.

Everything here is a pure function on arrays (scores, level-0 coordinates, a thumbnail), so it serves
every MIL model and can be tested without a model. The heatmap is painted on a canvas at thumbnail
scale: each patch becomes a small rectangle there, accumulated with a 2D difference array (four
scattered additions per patch, then two cumulative sums), so memory grows with the thumbnail, never
with the slide, and 100k patches cost a few megabytes of coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from scipy.stats import rankdata

from mambascope.atomic import atomic_path
from mambascope.errors import DataError

if TYPE_CHECKING:
    from mambascope.slides.reader import Slide

FONT = cv2.FONT_HERSHEY_SIMPLEX


def rank_normalise(scores: np.ndarray) -> np.ndarray:
    """Map scores to [0, 1] by rank (ties share their mean rank), so one extreme value cannot wash
    out the rest of the map and models with different score scales draw alike. A single patch is 1."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        return scores.astype(np.float32)
    if not np.all(np.isfinite(scores)):
        raise DataError("scores contain NaN or infinite values", hint="check the model's output")
    if scores.size == 1:
        return np.ones(1, dtype=np.float32)
    ranks = rankdata(scores, method="average")
    return ((ranks - 1.0) / (scores.size - 1.0)).astype(np.float32)


def patch_boxes(coords: np.ndarray, patch_size_level0: float, level0_dimensions: tuple[int, int],
                canvas_size: tuple[int, int]) -> np.ndarray:
    """Rectangles (x0, y0, x1, y1), end-exclusive, of each patch on a (w, h) canvas.

    Edges are floored, so patches that touch at level 0 touch on the canvas without overlapping, and
    every patch covers at least one canvas pixel however small the canvas.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    level0_w, level0_h = level0_dimensions
    canvas_w, canvas_h = canvas_size
    scale = np.array([canvas_w / level0_w, canvas_h / level0_h])
    start = np.floor(coords * scale).astype(np.int64)
    end = np.floor((coords + float(patch_size_level0)) * scale).astype(np.int64)
    end = np.maximum(end, start + 1)
    limit = np.array([canvas_w, canvas_h])
    start = np.clip(start, 0, limit)
    end = np.clip(end, 0, limit)
    return np.concatenate([start, end], axis=1)


def paint_scores(values: np.ndarray, boxes: np.ndarray, canvas_size: tuple[int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Average of the values of the patches covering each canvas pixel, and where any patch does.

    Returns (mean (h, w) float32, covered (h, w) bool). Overlapping patches (tiling with overlap)
    average; pixels outside every patch are 0 and not covered.
    """
    canvas_w, canvas_h = canvas_size
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.shape[0] != boxes.shape[0]:
        raise DataError(f"{values.shape[0]} scores for {boxes.shape[0]} patches",
                        hint="scores and coordinates must come from the same bag")
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, values = boxes[keep], values[keep]
    x0, y0, x1, y1 = boxes.T
    total = np.zeros((canvas_h + 1, canvas_w + 1), dtype=np.float64)
    count = np.zeros((canvas_h + 1, canvas_w + 1), dtype=np.int32)
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        np.add.at(total, (ys, xs), sign * values)
        np.add.at(count, (ys, xs), sign)
    total = total.cumsum(axis=0).cumsum(axis=1)[:canvas_h, :canvas_w]
    count = count.cumsum(axis=0).cumsum(axis=1)[:canvas_h, :canvas_w]
    covered = count > 0
    mean = np.zeros((canvas_h, canvas_w), dtype=np.float32)
    np.divide(total, count, out=total, where=covered)
    mean[covered] = total[covered]
    return mean, covered


def colour_lut(cmap: str = "jet") -> np.ndarray:
    """A matplotlib colour map as a (256, 3) uint8 lookup table."""
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise DataError(f"unknown colour map {cmap!r}",
                        hint="use a matplotlib colour map name such as jet, viridis, inferno, coolwarm") from None
    return (colormap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def blend_heatmap(thumbnail: np.ndarray, values: np.ndarray, covered: np.ndarray, *,
                  cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """Colour `values` in [0, 1] and blend them over the thumbnail where covered; elsewhere the
    thumbnail is left as it is."""
    lut = colour_lut(cmap)
    colour = lut[np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)]
    mixed = cv2.addWeighted(thumbnail, 1.0 - alpha, colour, alpha, 0.0)
    out = thumbnail.copy()
    np.copyto(out, mixed, where=covered[..., None])
    return out


def render_heatmap(scores: np.ndarray, coords: np.ndarray, patch_size_level0: float,
                   thumbnail: np.ndarray, level0_dimensions: tuple[int, int], *, cmap: str = "jet",
                   alpha: float = 0.5) -> np.ndarray:
    """Heatmap RGB of the thumbnail's size: rank-normalised scores painted at their patches and
    blended over the thumbnail; area outside patches stays uncoloured."""
    thumbnail = _check_rgb(thumbnail)
    coords = np.asarray(coords).reshape(-1, 2)
    if len(scores) != len(coords):
        raise DataError(f"{len(scores)} scores for {len(coords)} coordinates",
                        hint="scores and coordinates must come from the same bag")
    if not 0.0 <= alpha <= 1.0:
        raise DataError(f"heatmap alpha must lie in [0, 1], got {alpha}")
    canvas_size = (thumbnail.shape[1], thumbnail.shape[0])
    boxes = patch_boxes(coords, patch_size_level0, level0_dimensions, canvas_size)
    values, covered = paint_scores(rank_normalise(scores), boxes, canvas_size)
    return blend_heatmap(thumbnail, values, covered, cmap=cmap, alpha=alpha)


def add_colour_bar(image: np.ndarray, *, cmap: str = "jet", label: str = "attention rank") -> np.ndarray:
    """The image with a legend panel on its right: the colour bar from high (top) to low (bottom)."""
    image = _check_rgb(image)
    height = image.shape[0]
    scale = float(np.clip(height / 900.0, 0.35, 1.2))
    thickness = max(1, round(scale * 1.5))
    bar_w = max(12, round(28 * scale))
    (text_w, text_h), _ = cv2.getTextSize(label, FONT, scale, thickness)
    (tick_w, _), _ = cv2.getTextSize("high", FONT, scale, thickness)
    margin = max(6, round(10 * scale))
    panel_w = margin * 3 + bar_w + max(tick_w, text_w - bar_w - margin, 0)
    panel = np.full((height, panel_w, 3), 255, dtype=np.uint8)
    top = min(height - 1, margin * 2 + text_h)
    bottom = max(top + 1, height - margin)
    lut = colour_lut(cmap)
    ramp = np.linspace(255, 0, bottom - top).astype(np.int64)
    panel[top:bottom, margin:margin + bar_w] = lut[ramp][:, None, :]
    cv2.putText(panel, label, (margin, margin + text_h), FONT, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    tick_x = margin * 2 + bar_w
    cv2.putText(panel, "high", (tick_x, top + text_h), FONT, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    cv2.putText(panel, "low", (tick_x, bottom), FONT, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return np.concatenate([image, panel], axis=1)


def top_bottom_indices(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the k highest scores (highest first) and of the k lowest (lowest first), disjoint:
    with fewer than 2k patches the bottom row gets what the top row left."""
    scores = np.asarray(scores).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    top = order[:min(k, scores.size)]
    bottom = order[top.size:][::-1][:k]
    return top, bottom


@dataclass(frozen=True)
class GalleryTile:
    """One patch of a gallery, with what its caption says."""

    pixels: np.ndarray
    score: float
    location: tuple[int, int]


def read_tiles(slide: Slide, coords: np.ndarray, scores: np.ndarray, indices: np.ndarray,
               patch_size_level0: int, patch_size: int) -> list[GalleryTile]:
    """Read the chosen patches from the slide at the model's resolution (`patch_size` pixels for
    `patch_size_level0` level-0 pixels), as the features were computed."""
    tiles = []
    for index in indices:
        x, y = (int(v) for v in coords[index])
        pixels = slide.read_patch((x, y), int(patch_size_level0), int(patch_size))
        tiles.append(GalleryTile(pixels=pixels, score=float(scores[index]), location=(x, y)))
    return tiles


@dataclass(frozen=True)
class GalleryLayout:
    """Where everything sits in a gallery picture: a header strip per section, then rows of tiles
    with a caption strip under each tile."""

    n_top: int
    n_bottom: int
    tile_size: int
    columns: int
    title: bool
    gap: int = 4

    @property
    def font_scale(self) -> float:
        return float(np.clip(self.tile_size / 320.0, 0.35, 0.8))

    @property
    def caption_height(self) -> int:
        """Two caption lines: the score, then the level-0 location."""
        return 2 * round(30 * self.font_scale) + 8

    @property
    def header_height(self) -> int:
        return round(60 * self.font_scale) + 10

    @property
    def width(self) -> int:
        return self.columns * (self.tile_size + self.gap) + self.gap

    def grid_height(self, n: int) -> int:
        rows = -(-n // self.columns)
        return rows * (self.tile_size + self.caption_height + self.gap) + self.gap

    def origin(self, index: int) -> tuple[int, int]:
        """Top-left (x, y) of tile `index` (top tiles first, then bottom) in the whole picture."""
        y = self.header_height if self.title else 0
        if index >= self.n_top:
            if self.n_top:
                y += self.header_height + self.grid_height(self.n_top)
            index -= self.n_top
        row, col = divmod(index, self.columns)
        x0, y0 = self.origin_in_grid(row, col)
        return x0, y + self.header_height + y0

    def origin_in_grid(self, row: int, col: int) -> tuple[int, int]:
        return (self.gap + col * (self.tile_size + self.gap),
                self.gap + row * (self.tile_size + self.caption_height + self.gap))


def gallery_layout(n_top: int, n_bottom: int, tile_size: int, *, columns: int = 8,
                   title: bool = False) -> GalleryLayout:
    """The layout `render_gallery` uses for these counts (columns capped at the larger group)."""
    columns = max(1, min(columns, max(n_top, n_bottom)))
    return GalleryLayout(n_top=n_top, n_bottom=n_bottom, tile_size=tile_size, columns=columns, title=title)


def render_gallery(top: Sequence[GalleryTile], bottom: Sequence[GalleryTile], *, columns: int = 8,
                   title: str = "") -> np.ndarray:
    """Grid picture: an optional title, then the top tiles, then the bottom tiles, each captioned
    with its score and level-0 location. All tiles must share one size."""
    tiles = [*top, *bottom]
    if not tiles:
        raise DataError("no patches to show in the gallery", hint="the bag is empty")
    size = tiles[0].pixels.shape[0]
    if any(t.pixels.shape != (size, size, 3) for t in tiles):
        raise DataError("gallery tiles differ in size", hint="read every patch at the same resolution")
    layout = gallery_layout(len(top), len(bottom), size, columns=columns, title=bool(title))
    scale = layout.font_scale
    sections = []
    if title:
        sections.append(_text_strip(title, layout.width, layout.header_height, scale * 1.2))
    for name, group in ((f"top {len(top)}: highest scores", top),
                        (f"bottom {len(bottom)}: lowest scores", bottom)):
        if not group:
            continue
        sections.append(_text_strip(name, layout.width, layout.header_height, scale))
        grid = np.full((layout.grid_height(len(group)), layout.width, 3), 255, dtype=np.uint8)
        for i, tile in enumerate(group):
            x, y = layout.origin_in_grid(*divmod(i, layout.columns))
            grid[y:y + size, x:x + size] = tile.pixels
            lines = (f"{tile.score:.3g}", f"({tile.location[0]}, {tile.location[1]})")
            line_height = (layout.caption_height - 8) // 2
            for row, line in enumerate(lines):
                width = cv2.getTextSize(line, FONT, scale * 0.8, 1)[0][0]
                fitted = scale * 0.8 * min(1.0, (size - 4) / max(width, 1))  # never wider than the tile
                cv2.putText(grid, line, (x + 2, y + size + (row + 1) * line_height + 2), FONT, fitted,
                            (0, 0, 0), 1, cv2.LINE_AA)
        sections.append(grid)
    return np.concatenate(sections, axis=0)


def save_png(path: str | Path, image: np.ndarray, text: dict[str, str] | None = None) -> Path:
    """Write an RGB array as a PNG atomically, with optional text chunks (e.g. what drew it)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(_check_rgb(image)).save(tmp, format="PNG", pnginfo=info)
    return path


def png_text(path: str | Path) -> dict[str, str] | None:
    """The text chunks of a PNG that exists and decodes fully; None for a missing or broken file
    (so a rerun redraws it)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with Image.open(path) as image:
            image.load()
            return dict(getattr(image, "text", {}))
    except (OSError, SyntaxError, ValueError):
        return None


def _text_strip(text: str, width: int, height: int, scale: float) -> np.ndarray:
    strip = np.full((height, width, 3), 255, dtype=np.uint8)
    thickness = max(1, round(scale * 1.5))
    (_, text_h), _ = cv2.getTextSize(text, FONT, scale, thickness)
    cv2.putText(strip, text, (6, (height + text_h) // 2), FONT, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return strip


def _check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"expected an RGB uint8 image (h, w, 3), got {image.dtype} {image.shape}")
    return image
