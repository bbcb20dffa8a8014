"""Heatmap and gallery rendering on the real Aperio SVS."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from mambascope.errors import DataError
from mambascope.eval.heatmaps import (
    add_colour_bar,
    gallery_layout,
    patch_boxes,
    rank_normalise,
    read_tiles,
    render_gallery,
    render_heatmap,
    save_png,
    top_bottom_indices,
)
from predict_helpers import grid_coords, svs_path


@pytest.fixture(scope="module")
def slide():
    from mambascope.slides.reader import open_slide

    with open_slide(svs_path()) as handle:
        yield handle


@pytest.fixture(scope="module")
def thumbnail(slide):
    return slide.thumbnail(600)


def test_rank_normalise_spreads_ranks_and_shares_ties():
    values = rank_normalise(np.array([10.0, -3.0, 0.5, 0.5, 1e9]))
    np.testing.assert_allclose(values, [0.75, 0.0, 0.375, 0.375, 1.0])
    assert rank_normalise(np.array([0.2])).tolist() == [1.0]
    with pytest.raises(DataError):
        rank_normalise(np.array([0.1, np.nan]))


def test_heatmap_has_the_thumbnail_size(slide, thumbnail):
    coords = grid_coords(slide.dimensions, 256)
    scores = np.random.default_rng(0).random(len(coords))
    heat = render_heatmap(scores, coords, 256, thumbnail, slide.dimensions)
    assert heat.shape == thumbnail.shape and heat.dtype == np.uint8
    with_legend = add_colour_bar(heat)
    assert with_legend.shape[0] == thumbnail.shape[0] and with_legend.shape[1] > thumbnail.shape[1]
    assert np.array_equal(with_legend[:, : thumbnail.shape[1]], heat)


def _expected_box(coord, size0, level0, thumb_shape):
    """Thumbnail pixels a level-0 patch spans, from the scale alone."""
    sx, sy = thumb_shape[1] / level0[0], thumb_shape[0] / level0[1]
    x, y = coord
    return int(x * sx), int(y * sy), int((x + size0) * sx), int((y + size0) * sy)


def test_planted_scores_light_exactly_their_patches(slide, thumbnail):
    coords = grid_coords(slide.dimensions, 256)
    rng = np.random.default_rng(1)
    scores = rng.random(len(coords))
    planted = [3, 17, len(coords) - 5]
    scores[planted] = 5.0
    # grey colour map, fully opaque: each covered pixel shows its rank value * 255
    heat = render_heatmap(scores, coords, 256, thumbnail, slide.dimensions, cmap="gray", alpha=1.0)[..., 0]
    hot = heat >= 250
    expected = np.zeros_like(hot)
    for index in planted:
        x0, y0, x1, y1 = _expected_box(coords[index], 256, slide.dimensions, thumbnail.shape)
        assert hot[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].all(), f"patch {index} is not lit"
        expected[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = True
    assert not (hot & ~expected).any(), "pixels outside the planted patches are lit"
    # every other patch shows a lower value
    others = np.setdiff1d(np.arange(len(coords)), planted)
    for index in others[:: max(1, len(others) // 10)]:
        x0, y0, x1, y1 = _expected_box(coords[index], 256, slide.dimensions, thumbnail.shape)
        assert heat[(y0 + y1) // 2, (x0 + x1) // 2] < 250


def test_blend_keeps_uncovered_thumbnail_and_mixes_covered(slide, thumbnail):
    # patches only on the left half: the right half must be the untouched thumbnail
    coords = grid_coords(slide.dimensions, 256)
    coords = coords[coords[:, 0] + 256 <= slide.dimensions[0] // 2]
    scores = np.random.default_rng(2).random(len(coords))
    heat = render_heatmap(scores, coords, 256, thumbnail, slide.dimensions, alpha=0.5)
    half = thumbnail.shape[1] // 2 + 1
    assert np.array_equal(heat[:, half:], thumbnail[:, half:])
    x0, y0, x1, y1 = _expected_box(coords[0], 256, slide.dimensions, thumbnail.shape)
    covered = heat[y0:y1, x0:x1].astype(int)
    assert np.abs(covered - thumbnail[y0:y1, x0:x1]).max() > 20  # colour is visible over the tissue


def test_overlapping_patches_average():
    thumb = np.full((100, 100, 3), 77, dtype=np.uint8)
    coords = np.array([[0, 0], [50, 0]])  # 100-px patches on a 200-px slide: overlap on x in [50, 100)
    heat = render_heatmap(np.array([0.0, 1.0]), coords, 100, thumb, (200, 200), cmap="gray", alpha=1.0)[..., 0]
    assert heat[10, 10] == 0 and heat[10, 30] == 128 and heat[10, 60] == 255
    assert heat[80, 10] == 77 and heat[10, 90] == 77  # outside every patch: the thumbnail


def test_patch_boxes_tile_without_gaps():
    coords = grid_coords((1000, 1000), 100)
    boxes = patch_boxes(coords, 100, (1000, 1000), (333, 333))
    covered = np.zeros((333, 333), dtype=int)
    for x0, y0, x1, y1 in boxes:
        covered[y0:y1, x0:x1] += 1
    assert (covered == 1).all()


def test_hundred_thousand_patches_render_in_a_few_hundred_megabytes():
    rng = np.random.default_rng(3)
    n = 100_000
    level0 = (160_000, 90_000)
    coords = np.stack([rng.integers(0, level0[0] - 512, n), rng.integers(0, level0[1] - 512, n)], axis=1)
    thumb = np.full((1152, 2048, 3), 230, dtype=np.uint8)
    scores = rng.random(n).astype(np.float32)
    tracemalloc.start()
    try:
        heat = render_heatmap(scores, coords, 512, thumb, level0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert heat.shape == thumb.shape
    assert peak < 300 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_top_bottom_indices_are_ordered_and_disjoint():
    scores = np.array([0.3, 0.9, 0.1, 0.5, 0.7])
    top, bottom = top_bottom_indices(scores, 2)
    assert top.tolist() == [1, 4] and bottom.tolist() == [2, 0]
    top, bottom = top_bottom_indices(scores, 4)
    assert top.tolist() == [1, 4, 3, 0] and bottom.tolist() == [2]


def test_gallery_shows_slide_patches_at_model_resolution(slide, tmp_path):
    coords = grid_coords(slide.dimensions, 512)
    scores = np.random.default_rng(4).random(len(coords))
    top, bottom = top_bottom_indices(scores, 3)
    # features made at half the level-0 resolution: 512 level-0 pixels -> 256-pixel patches
    top_tiles = read_tiles(slide, coords, scores, top, 512, 256)
    bottom_tiles = read_tiles(slide, coords, scores, bottom, 512, 256)
    assert all(t.pixels.shape == (256, 256, 3) for t in top_tiles + bottom_tiles)
    picture = render_gallery(top_tiles, bottom_tiles, title="CMU-1-Small-Region")
    layout = gallery_layout(3, 3, 256, title=True)
    for i, tile in enumerate(top_tiles + bottom_tiles):
        x, y = layout.origin(i)
        assert np.array_equal(picture[y : y + 256, x : x + 256], tile.pixels)
    # the first top tile is the best-scoring patch, read from the slide itself
    best = slide.read_patch(tuple(coords[np.argmax(scores)]), 512, 256)
    x, y = layout.origin(0)
    assert np.array_equal(picture[y : y + 256, x : x + 256], best)
    assert best.std() > 5  # real pixels, not a blank canvas
    path = save_png(tmp_path / "gallery.png", picture)
    from PIL import Image

    assert Image.open(path).size == (picture.shape[1], picture.shape[0])
