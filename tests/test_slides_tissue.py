"""Tissue detection on the four real images (H&E and Ki67 IHC), user masks, tissue fraction by area."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mambascope.errors import DataError
from mambascope.sample_data import sample_path
from mambascope.slides.reader import open_slide
from mambascope.slides.tissue import detect_tissue, fill_small_holes, load_user_mask, tissue_fractions
from slides_helpers import OME_HE, OME_IHC_NDPI, OME_IHC_VSI, SVS, background_fraction


def _mask_of(name: str, side: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    with open_slide(sample_path(name)) as slide:
        downsample = max(slide.dimensions) / side
        rgb = slide.read_downsampled(downsample)
        return rgb, detect_tissue(rgb, slide.mpp * downsample)


@pytest.mark.parametrize(("name", "low", "high"), [(SVS, 0.35, 0.55), (OME_HE, 0.97, 1.0),
                                                   (OME_IHC_NDPI, 0.75, 0.95), (OME_IHC_VSI, 0.75, 0.95)])
def test_mask_covers_tissue_not_glass(name, low, high):
    rgb, mask = _mask_of(name)
    assert low <= mask.mean() <= high
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    assert saturation[mask].mean() > 15  # stained, even the pale IHC counterstain
    if (~mask).any():  # what is left out is glass
        assert background_fraction(rgb[~mask][None]) > 0.95
        assert saturation[mask].mean() > saturation[~mask].mean() + 10


def test_ihc_glass_region_is_excluded():
    # the large empty lumen left of centre in the Ki67 crops (found by eye on the thumbnails)
    for name, (x, y) in [(OME_IHC_NDPI, (0.12, 0.68)), (OME_IHC_VSI, (0.12, 0.68))]:
        _, mask = _mask_of(name)
        assert not mask[int(y * mask.shape[0]), int(x * mask.shape[1])]


def test_saturation_alone_would_split_a_tissue_only_field():
    rgb, mask = _mask_of(OME_HE)
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    _, plain = cv2.threshold(saturation, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    assert plain.mean() < 0.7  # plain Otsu calls a third or more of this all-tissue field background
    assert mask.mean() > 0.97


def test_small_holes_filled_large_kept():
    mask = np.ones((60, 60), dtype=bool)
    mask[10:13, 10:13] = False  # 9 px hole
    mask[30:50, 30:50] = False  # 400 px hole
    filled = fill_small_holes(mask, 50)
    assert filled[11, 11] and not filled[40, 40]


def test_tissue_fraction_is_exact_by_area():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.5
    slide_size = (53 * 7, 37 * 7)  # 7 level-0 pixels per mask pixel
    coords = rng.integers(0, 200, size=(40, 2))
    fractions = tissue_fractions(mask, coords, 45, slide_size)
    fine = np.kron(mask, np.ones((7, 7), dtype=bool))  # the mask at level 0
    expected = [fine[y:y + 45, x:x + 45].sum() / 45**2 for x, y in coords]
    np.testing.assert_allclose(fractions, expected, atol=1e-9)


def test_user_mask_rescaled_and_aspect_checked(tmp_path):
    painted = np.zeros((300, 200), dtype=np.uint8)
    painted[:, 100:] = 255
    cv2.imwrite(str(tmp_path / "m_mask.png"), painted)
    mask = load_user_mask(tmp_path / "m_mask.png", (150, 100), slide_size=(2000, 3000))
    assert mask.shape == (150, 100)
    assert not mask[:, :50].any() and mask[:, 50:].all()
    with pytest.raises(DataError, match="aspect ratio"):
        load_user_mask(tmp_path / "m_mask.png", (100, 100), slide_size=(3000, 3000))


def test_field_of_glass_only_has_no_tissue_even_with_small_min_area():
    """A real all-glass field from the SVS: its saturation noise must not be split into 'tissue'."""
    from mambascope.slides.tissue import TissueParams

    with open_slide(sample_path(SVS)) as slide:
        glass = slide.read_region((256, 256), 0, (256, 256))
        assert background_fraction(glass) > 0.95
        mask = detect_tissue(glass, slide.mpp, TissueParams(min_area_um2=500.0, max_hole_area_um2=500.0))
    assert not mask.any()
