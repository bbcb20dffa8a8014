"""Fast grid reading (`Slide.read_patches`, direct tile decoding) gives exactly `read_patch`'s pixels."""

from __future__ import annotations

import numpy as np
import pytest

from features_helpers import SVS
from mambascope.errors import SlideReadError
from mambascope.slides.pyramid_tiff import write_pyramidal_tiff
from mambascope.slides.reader import open_slide
from mambascope.slides.tiff_tiles import TiffTileReader


def grid_with_borders(width: int, height: int, size_level0: int) -> np.ndarray:
    """Overlapping grid positions, including patches hanging over every border and one wholly outside."""
    step = size_level0 * 2 // 3
    xs = np.arange(-size_level0 // 3, width, step)
    ys = np.concatenate([np.arange(-size_level0 // 2, 3 * step, step), [height - size_level0 // 2]])
    cells = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    return np.concatenate([cells, [[width + 5, height + 5]]]).astype(np.int64)


def per_patch(slide, locations: np.ndarray, size_level0: int, out_size: int) -> np.ndarray:
    return np.stack([slide.read_patch((int(x), int(y)), size_level0, out_size) for x, y in locations])


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> object:
    """The real SVS as a 3-level JPEG pyramid with 240-px tiles (downsamples 1, ~2.0003, ~4.002)."""
    with open_slide(SVS) as slide:
        rgb = slide.read_region((0, 0), 0, slide.dimensions)
        mpp = slide.mpp
    return write_pyramidal_tiff(tmp_path_factory.mktemp("pyramid") / "pyramid.tif", rgb, mpp, tile=240,
                                min_size=500)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
@pytest.mark.parametrize("size_level0,out_size", [(256, 256), (512, 224), (300, 256)])
def test_read_patches_equals_read_patch_on_the_real_svs(backend, size_level0, out_size):
    with open_slide(SVS, backend=backend) as slide:
        locations = grid_with_borders(*slide.dimensions, size_level0)
        fast = slide.read_patches(locations, size_level0, out_size)
        assert slide._tile_level(0)  # the tiles were decoded directly, not through the library
        expected = per_patch(slide, locations, size_level0, out_size)
    assert fast.shape == (len(locations), out_size, out_size, 3) and fast.dtype == np.uint8
    np.testing.assert_array_equal(fast, expected)
    assert (fast[-1] == 255).all() and (fast[0, :10, :10] == 255).all()  # white outside the slide
    assert fast[len(locations) // 2].std() > 5  # real tissue pixels, not a blank region


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
@pytest.mark.parametrize("size_level0", [512, 1024])
def test_read_patches_equals_read_patch_at_coarser_pyramid_levels(pyramid, backend, size_level0):
    with open_slide(pyramid, backend=backend) as slide:
        level = slide.best_level_for_downsample(size_level0 / 256)
        assert level == {512: 1, 1024: 2}[size_level0]
        locations = grid_with_borders(*slide.dimensions, size_level0)
        out = np.zeros((len(locations), 256, 256, 3), dtype=np.uint8)
        returned = slide.read_patches(locations, size_level0, 256, out=out)
        expected = per_patch(slide, locations, size_level0, 256)
        if backend == "tiffslide":  # tiffslide reads whole level pixels, so its levels are served directly
            assert slide._tile_level(level)
    assert returned is out
    np.testing.assert_array_equal(out, expected)


def test_a_tile_reader_that_disagrees_with_the_library_is_not_used(monkeypatch):
    original = TiffTileReader.read

    def brightened(self, *args, **kwargs):
        pixels = original(self, *args, **kwargs)
        pixels |= 1
        return pixels

    monkeypatch.setattr(TiffTileReader, "read", brightened)
    with open_slide(SVS) as slide:
        locations = grid_with_borders(*slide.dimensions, 256)[:12]
        fast = slide.read_patches(locations, 256, 256)
        assert not slide._tile_level(0)
        np.testing.assert_array_equal(fast, per_patch(slide, locations, 256, 256))


def test_an_undecodable_tile_raises_slide_read_error(tmp_path):
    from features_helpers import corrupt_tile_copy

    broken = tmp_path / "broken.svs"
    x, y = corrupt_tile_copy(broken, 12)
    with open_slide(broken, backend="tiffslide") as slide:
        slide.read_patches(np.array([[0, 0]]), 256, 256)  # tiles elsewhere decode fine
        with pytest.raises(SlideReadError, match="cannot read pixels"):
            slide.read_patches(np.array([[x + 10, y + 10]]), 256, 256)
