"""Slide reader on the real slides, a pyramidal TIFF written from real pixels, and broken files."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mambascope.errors import DataError, SlideReadError
from mambascope.sample_data import SAMPLE_DIR, sample_path
from mambascope.slides.reader import (
    file_fingerprint,
    list_slides,
    mpp_from_properties,
    open_slide,
    slide_id_from_path,
)
from slides_helpers import (
    OME_HE,
    OME_IHC_NDPI,
    OME_IHC_VSI,
    SVS,
    corrupted_copy,
    pyramid_from_svs,
    svs_pixels,
    truncated_copy,
)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    return pyramid_from_svs(tmp_path_factory.mktemp("pyr") / "pyramid-slide.tiff", mpp=0.25)


def test_svs_metadata_with_openslide_and_tiffslide():
    for backend in ("auto", "openslide", "tiffslide"):
        with open_slide(sample_path(SVS), backend=backend) as slide:
            assert slide.dimensions == (2220, 2967)
            assert slide.level_count == 1
            assert slide.mpp == pytest.approx(0.499)
            assert slide.magnification == pytest.approx(20.0)
            assert slide.slide_id == "CMU-1-Small-Region"
    with open_slide(sample_path(SVS)) as slide:
        assert slide.reader == "openslide"


@pytest.mark.parametrize(("name", "size", "mpp"), [(OME_HE, 1101, 0.22710), (OME_IHC_NDPI, 2202, 0.22710),
                                                   (OME_IHC_VSI, 1445, 0.34605)])
def test_ome_tiff_crops_open_and_read_mpp_from_ome_xml(name, size, mpp):
    with open_slide(sample_path(name), backend="image") as image, open_slide(sample_path(name)) as auto:
        assert image.dimensions == auto.dimensions == (size, size)
        assert image.mpp == pytest.approx(mpp, rel=1e-3)
        assert image.properties["ome.mpp-x"].startswith(str(mpp)[:5])
        assert auto.mpp == pytest.approx(mpp, rel=1e-3)
        assert auto.reader in {"tiffslide", "image"}
        region = (200, 300)
        np.testing.assert_array_equal(image.read_region(region, 0, (64, 48)), auto.read_region(region, 0, (64, 48)))
    with pytest.raises(SlideReadError, match="openslide"):
        open_slide(sample_path(name), backend="openslide")


def test_read_region_matches_pixels_and_pads_outside_white():
    pixels = svs_pixels()
    with open_slide(sample_path(SVS)) as slide:
        np.testing.assert_array_equal(slide.read_region((100, 200), 0, (50, 40)), pixels[200:240, 100:150])
        corner = slide.read_region((2200, -10), 0, (40, 30))
    assert corner.shape == (30, 40, 3)
    assert (corner[:10] == 255).all() and (corner[:, 20:] == 255).all()
    np.testing.assert_array_equal(corner[10:, :20], pixels[:20, 2200:2220])


def test_pyramid_tiff_levels_mpp_and_best_level(pyramid):
    for backend in ("openslide", "tiffslide", "image"):
        with open_slide(pyramid, backend=backend) as slide:
            assert slide.dimensions == (4440, 2967)
            assert slide.level_count == 3
            assert slide.mpp == pytest.approx(0.25)
            assert slide.level_downsamples[1] == pytest.approx(4.0, rel=0.01)
            assert slide.best_level_for_downsample(1.0) == 0
            assert slide.best_level_for_downsample(3.99) == 1
            assert slide.best_level_for_downsample(8.0) == 1
            assert slide.best_level_for_downsample(100.0) == 2


def test_read_patch_reads_best_level_and_resizes(pyramid):
    with open_slide(pyramid, backend="tiffslide") as slide:
        patch = slide.read_patch((1024, 1024), 1024, 256)  # 4x downsample: level 1, no resize
        direct = slide.read_region((1024, 1024), 1, (256, 256))
        smaller = slide.read_patch((1024, 1024), 1024, 128)  # 8x: level 1 then halved
        full = slide.read_patch((1024, 1024), 512, 512)
    assert patch.shape == (256, 256, 3)
    np.testing.assert_array_equal(patch, direct)
    expected = cv2.resize(direct, (128, 128), interpolation=cv2.INTER_AREA)
    assert np.abs(smaller.astype(int) - expected).max() <= 1
    # level 0 is JPEG-compressed real pixels of the SVS, tiled twice side by side
    assert np.abs(full.astype(int) - svs_pixels()[1024:1536, 1024:1536]).mean() < 6


def test_thumbnail_keeps_aspect_and_content(pyramid):
    with open_slide(pyramid) as slide:
        thumb = slide.thumbnail(500)
    assert thumb.shape == (334, 500, 3)
    reference = cv2.resize(np.tile(svs_pixels(), (1, 2, 1)), (500, 334), interpolation=cv2.INTER_AREA)
    assert np.abs(thumb.astype(int) - reference).mean() < 8


def test_fingerprint_is_cheap_and_content_dependent(tmp_path):
    with open_slide(sample_path(SVS)) as slide:
        assert slide.fingerprint() == file_fingerprint(sample_path(SVS))
    copy = corrupted_copy(SVS, tmp_path / "changed.svs", 1_900_000, 1_900_010)
    assert file_fingerprint(copy) != file_fingerprint(sample_path(SVS))
    renamed = tmp_path / "renamed.svs"
    renamed.write_bytes(sample_path(SVS).read_bytes())
    assert file_fingerprint(renamed) == file_fingerprint(sample_path(SVS))  # same bytes, other name


def test_mpp_override_and_vendor_fallbacks():
    with open_slide(sample_path(OME_HE), mpp_override=0.5) as slide:
        assert slide.mpp == 0.5
    assert mpp_from_properties({"aperio.MPP": "0.2520"}) == pytest.approx(0.252)
    assert mpp_from_properties({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"}) == 0.25
    assert mpp_from_properties({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"}) is None  # 352 µm/px
    assert mpp_from_properties({"philips.DICOM_PIXEL_SPACING": '"0.000227" "0.000227"'}) == pytest.approx(0.227)
    assert mpp_from_properties({}) is None


def test_slide_ids():
    assert slide_id_from_path("a/OS-1-detail.ome.tif") == "OS-1-detail"
    assert slide_id_from_path("CMU-1.svs") == "CMU-1"
    assert slide_id_from_path("TCGA-AA-0001.5F2A.svs") == "TCGA-AA-0001.5F2A"


def test_list_slides_from_directory_and_csv(tmp_path):
    entries = list_slides(SAMPLE_DIR)
    assert [e.slide_id for e in entries] == ["CMU-1-Small-Region", "OS-1-detail", "OS-2-ndpi", "OS-2-vsi"]
    csv = tmp_path / "slides.csv"
    relative = "../" * len(tmp_path.parts) + str(sample_path(OME_HE)).lstrip("/")
    csv.write_text(f"slide_id,path,label,mpp\ncase1,{sample_path(SVS)},tumor,\ncase2,{relative},normal,0.3\n")
    first, second = list_slides(csv)
    assert (first.slide_id, first.mpp_override, first.extra) == ("case1", None, {"label": "tumor"})
    assert second.path.resolve() == sample_path(OME_HE).resolve()
    assert second.mpp_override == 0.3
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,file\na,b.svs\n")
    with pytest.raises(DataError, match="path"):
        list_slides(bad)
    bad.write_text("slide_id,path,mpp\na,b.svs,fast\n")
    with pytest.raises(DataError, match="mpp"):
        list_slides(bad)
    with pytest.raises(DataError, match="not found"):
        list_slides(tmp_path / "missing")


def test_broken_files_raise_slide_read_error(tmp_path):
    with pytest.raises(SlideReadError, match="not found"):
        open_slide(tmp_path / "missing.svs")
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(SlideReadError, match="empty"):
        open_slide(tmp_path / "empty.svs")
    with pytest.raises(SlideReadError, match="truncated or corrupt"):
        open_slide(truncated_copy(SVS, tmp_path / "cut.svs", 0.3))
    (tmp_path / "notes.xyz").write_text("not a slide")
    with pytest.raises(SlideReadError, match="unsupported slide format"):
        open_slide(tmp_path / "notes.xyz")
    # header intact, tile data destroyed: opens, then the read fails with a clear error
    with open_slide(corrupted_copy(SVS, tmp_path / "corrupt.svs", 20_000, 400_000)) as slide, \
            pytest.raises(SlideReadError, match="truncated or corrupt"):
        slide.read_region((0, 0), 0, slide.dimensions)


def test_dicom_series_folders_are_one_slide_each(tmp_path):
    for series in ("case-a", "case-b"):
        (tmp_path / series).mkdir()
        for index in range(3):
            (tmp_path / series / f"{index}.dcm").write_bytes(b"DICM" * 40)
    assert [(e.slide_id, e.path.name) for e in list_slides(tmp_path)] == [("case-a", "case-a"), ("case-b", "case-b")]
    assert [e.slide_id for e in list_slides(tmp_path / "case-a")] == ["case-a"]
    assert slide_id_from_path(tmp_path / "case-a" / "1.dcm") == "case-a"
    with pytest.raises(SlideReadError, match=r"cannot open slide .*openslide"):
        open_slide(tmp_path / "case-a")
