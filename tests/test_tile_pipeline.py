"""Tiling end to end (Python API) on the real slides, a pyramidal TIFF from real pixels, and bad inputs."""

from __future__ import annotations

import json

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest

from mambascope.errors import ConfigError
from mambascope.sample_data import SAMPLE_DIR, sample_path
from mambascope.slides import SlideEntry, TilingConfig, open_slide, read_coords, tile_slides
from mambascope.slides.reader import file_fingerprint
from mambascope.slides.tiling import SlideOutputs
from slides_helpers import (
    OME_HE,
    OME_IHC_VSI,
    REAL_SLIDES,
    SVS,
    corrupted_copy,
    pyramid_from_svs,
    truncated_copy,
)

PATCH = 128


def _not_background(patch: np.ndarray) -> bool:
    gray = cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY)
    return gray.std() > 10 and gray.mean() < 235  # glass is flat (std ~1) and bright


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiled")
    report = tile_slides(SAMPLE_DIR, out, TilingConfig(patch_size=PATCH, save_patches=True))
    return out, report


def test_every_real_slide_tiled_with_outputs(tiled):
    out, report = tiled
    assert [r.status for r in report.results] == ["tiled"] * 4
    table = pd.read_csv(out / "processed_metadata.csv")
    assert list(table["slide_id"]) == ["CMU-1-Small-Region", "OS-1-detail", "OS-2-ndpi", "OS-2-vsi"]
    assert {"num_patches", "mpp", "magnification", "status", "error"} <= set(table.columns)
    assert table.loc[0, "magnification"] == 20 and table.loc[0, "mpp"] == pytest.approx(0.499)
    for result in report.results:
        outputs = SlideOutputs.for_slide(out, result.slide_id)
        for path in (outputs.coords, outputs.patches, outputs.thumbnail, outputs.contours):
            assert path.is_file(), path
        assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("name", REAL_SLIDES)
def test_coordinates_inside_on_grid_and_on_tissue(tiled, name):
    out, _ = tiled
    slide_id = name.split(".")[0]
    coords, attrs = read_coords(out / "coords" / f"{slide_id}.h5")
    with open_slide(sample_path(name)) as slide:
        width, height = slide.dimensions
        size0 = attrs["patch_size_level0"]
        assert len(coords) > 0
        assert (coords >= 0).all() and (coords[:, 0] + size0 <= width).all() and (coords[:, 1] + size0 <= height).all()
        assert (coords % attrs["step_size_level0"] == 0).all()
        assert len(np.unique(coords, axis=0)) == len(coords)
        with h5py.File(SlideOutputs.for_slide(out, slide_id).patches, "r") as handle:
            data = handle["data"]
            assert data.shape == (len(coords), PATCH, PATCH, 3) and data.dtype == np.uint8
            assert data.chunks == (1, PATCH, PATCH, 3)
            np.testing.assert_array_equal(handle["coords"][()], coords)
            assert all(_not_background(patch) for patch in data[()])
            for index in (0, len(coords) // 2, len(coords) - 1):
                np.testing.assert_array_equal(data[index], slide.read_patch(tuple(coords[index]), size0, PATCH))


def test_attributes_and_clam_style_reading(tiled):
    out, _ = tiled
    _, attrs = read_coords(out / "coords" / "OS-1-detail.h5")
    assert attrs["patch_size"] == PATCH
    assert attrs["level0_mpp"] == pytest.approx(0.22710, rel=1e-3)
    assert attrs["level0_magnification"] == pytest.approx(10 / 0.22710, rel=1e-3)  # no objective: 10 µm/px at 1x
    assert attrs["target_magnification"] == pytest.approx(20, rel=0.01)
    assert attrs["patch_size_level0"] == round(PATCH * 0.5 / 0.22710)  # 20x = 0.5 µm/px
    assert (attrs["level0_width"], attrs["level0_height"]) == (1101, 1101)
    assert attrs["reader"] == "tiffslide" and attrs["overlap"] == 0 and attrs["tissue_threshold"] == 0.5
    assert attrs["slide_fingerprint"] == file_fingerprint(sample_path(OME_HE))
    assert attrs["name"] == "OS-1-detail" and attrs["mambascope_version"]
    # CLAM: read_region(coord, patch_level, (patch_size, patch_size)) from the coords dataset attributes
    with h5py.File(out / "coords" / "CMU-1-Small-Region.h5", "r") as handle:
        dset = handle["coords"]
        level, size = int(dset.attrs["patch_level"]), int(dset.attrs["patch_size"])
        first = tuple(int(v) for v in dset[0])
    import openslide

    with openslide.OpenSlide(str(sample_path(SVS))) as clam_slide:
        region = np.asarray(clam_slide.read_region(first, level, (size, size)).convert("RGB"))
    assert _not_background(region)


def test_geojson_and_thumbnail(tiled):
    out, _ = tiled
    geo = json.loads((out / "contours" / "CMU-1-Small-Region.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and geo["features"]
    area = 0.0
    for feature in geo["features"]:
        assert feature["properties"]["objectType"] == "annotation"
        assert feature["properties"]["classification"]["name"] == "Tissue"
        rings = feature["geometry"]["coordinates"]
        for index, ring in enumerate(rings):
            points = np.array(ring)
            assert (points[0] == points[-1]).all() and len(points) >= 4
            assert (points >= 0).all() and (points[:, 0] <= 2220).all() and (points[:, 1] <= 2967).all()
            ring_area = abs(cv2.contourArea(points.astype(np.float32)))
            area += -ring_area if index else ring_area
    assert 0.35 < area / (2220 * 2967) < 0.55  # the tissue share measured on the mask
    thumb = cv2.imread(str(out / "thumbnails" / "CMU-1-Small-Region.png"))[..., ::-1]
    assert max(thumb.shape[:2]) == 1024
    green = (thumb[..., 1] == 170) & (thumb[..., 0] == 0) & (thumb[..., 2] == 0)
    blue = (thumb[..., 0] == 30) & (thumb[..., 1] == 90) & (thumb[..., 2] == 230)
    assert green.sum() > 500 and blue.sum() > 500


def test_counts_follow_magnification_threshold_and_overlap(tmp_path):
    def count(**kw) -> int:
        report = tile_slides([SlideEntry("svs", sample_path(SVS))], tmp_path / str(len(kw)) / str(kw),
                             TilingConfig(patch_size=PATCH, **kw))
        assert report.results[0].status == "tiled", report.results[0].error
        return report.results[0].num_patches

    at_20x, at_10x = count(), count(magnification=10)
    assert at_10x < at_20x / 2.5  # patches cover 4x the area
    assert count(mpp=0.998) == at_10x  # 10x on a 0.499 µm/px scan
    strict, loose = count(tissue_threshold=0.9), count(tissue_threshold=0.1)
    assert strict < at_20x < loose
    assert count(overlap=PATCH // 2) > 3 * at_20x


def test_pyramid_reads_from_the_matching_level(tmp_path):
    pyramid = pyramid_from_svs(tmp_path / "pyr.tif", mpp=0.25)
    report = tile_slides(pyramid.parent, tmp_path / "out", TilingConfig(patch_size=PATCH, magnification=10,
                                                                        save_patches=True))
    result = report.results[0]
    assert (result.status, result.reader, result.patch_size_level0) == ("tiled", "openslide", PATCH * 4)
    coords, attrs = read_coords(tmp_path / "out" / "coords" / "pyr.h5")
    assert attrs["patch_level"] == 1 and attrs["target_mpp"] == pytest.approx(1.0)
    with open_slide(pyramid) as slide, h5py.File(tmp_path / "out/pyr/patches/pyr_patches.h5", "r") as handle:
        np.testing.assert_array_equal(handle["data"][3], slide.read_region(tuple(coords[3]), 1, (PATCH, PATCH)))
    # the pyramid holds the SVS pixels twice side by side: about twice the SVS's patches of 512 pixels
    svs = tile_slides([SlideEntry("svs", sample_path(SVS))], tmp_path / "svs",
                      TilingConfig(patch_size=PATCH, mpp=0.499 * 4)).results[0]
    assert svs.patch_size_level0 == 512
    assert 1.6 * svs.num_patches <= result.num_patches <= 2.4 * svs.num_patches


def test_resume_skips_complete_and_redoes_broken_or_stale(tmp_path):
    entries = [SlideEntry("vsi", sample_path(OME_IHC_VSI))]
    config = TilingConfig(patch_size=PATCH)
    first = tile_slides(entries, tmp_path, config).results[0]
    assert first.status == "tiled"
    assert tile_slides(entries, tmp_path, config).results[0].status == "skipped"
    coords_file = tmp_path / "coords" / "vsi.h5"
    coords_file.write_bytes(coords_file.read_bytes()[:500])  # a crash mid-copy
    again = tile_slides(entries, tmp_path, config).results[0]
    assert again.status == "tiled" and again.num_patches == first.num_patches
    assert read_coords(coords_file)[0].shape == (first.num_patches, 2)
    (tmp_path / "thumbnails" / "vsi.png").unlink()
    assert tile_slides(entries, tmp_path, config).results[0].status == "tiled"
    stale = tile_slides(entries, tmp_path, TilingConfig(patch_size=PATCH, tissue_threshold=0.9)).results[0]
    assert stale.status == "tiled" and stale.num_patches < first.num_patches
    with_patches = TilingConfig(patch_size=PATCH, tissue_threshold=0.9, save_patches=True)
    assert tile_slides(entries, tmp_path, with_patches).results[0].status == "tiled"  # patches were missing


def test_bad_inputs_are_recorded_while_others_finish(tmp_path):
    with open_slide(sample_path(SVS)) as slide:
        pixels = slide.read_region((0, 1200), 0, (1400, 1400))
    cv2.imwrite(str(tmp_path / "crop.png"), pixels[..., ::-1])
    cv2.imwrite(str(tmp_path / "blank.png"), np.full((800, 800, 3), 245, np.uint8))
    (tmp_path / "notes.txt").write_text("not a slide")
    rows = [
        ("good", sample_path(OME_IHC_VSI), ""),
        ("truncated", truncated_copy(SVS, tmp_path / "cut.svs", 0.5), ""),
        ("corrupt", corrupted_copy(SVS, tmp_path / "bad.svs", 20_000, 400_000), ""),
        ("unsupported", tmp_path / "notes.txt", ""),
        ("no_mpp", tmp_path / "crop.png", ""),
        ("with_mpp", tmp_path / "crop.png", "0.499"),
        ("blank", tmp_path / "blank.png", "0.5"),
        ("../escape", sample_path(OME_IHC_VSI), ""),
        ("good", sample_path(OME_HE), ""),
        ("missing", tmp_path / "nowhere.svs", ""),
    ]
    csv = tmp_path / "slides.csv"
    csv.write_text("slide_id,path,mpp,label\n" + "".join(f"{i},{p},{m},x\n" for i, p, m in rows))
    report = tile_slides(csv, tmp_path / "out", TilingConfig(patch_size=PATCH), workers=2)
    by_row = [(r.slide_id, r.status, r.error) for r in report.results]
    status = [s for _, s, _ in by_row]
    assert status == ["tiled", "failed", "failed", "failed", "failed", "tiled", "failed", "failed", "failed",
                      "failed"]
    errors = [e for _, _, e in by_row]
    assert "truncated or corrupt" in errors[1] and "truncated or corrupt" in errors[2]
    assert "unsupported slide format '.txt'" in errors[3]
    assert "no mpp" in errors[4] and "`mpp` column" in errors[4]
    assert "no tissue" in errors[6]
    assert "escape" in errors[7]
    assert "duplicate slide id 'good'" in errors[8]
    assert "not found" in errors[9]
    table = pd.read_csv(tmp_path / "out" / "processed_metadata.csv", keep_default_na=False)
    assert list(table["status"]) == status and (table["label"] == "x").all()
    assert not (tmp_path / "escape").exists() and not list((tmp_path / "out").rglob("*.tmp"))


def test_magnification_above_scan_and_upsample_flag(tmp_path):
    entries = [SlideEntry("svs", sample_path(SVS))]
    refused = tile_slides(entries, tmp_path / "a", TilingConfig(patch_size=PATCH, magnification=40)).results[0]
    assert refused.status == "failed" and "finer than the scan" in refused.error
    assert "--allow-upsample" in refused.error
    upsampled = tile_slides(entries, tmp_path / "b", TilingConfig(patch_size=PATCH, magnification=40,
                                                                  allow_upsample=True)).results[0]
    assert upsampled.status == "tiled" and upsampled.patch_size_level0 == PATCH // 2


def test_user_masks(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    half = np.zeros((2967 // 10, 2220 // 10), np.uint8)
    half[: half.shape[0] // 2] = 255  # upper half of the slide only
    cv2.imwrite(str(masks / "svs_mask.png"), half)
    cv2.imwrite(str(masks / "vsi_mask.png"), np.full((100, 300), 255, np.uint8))  # wrong aspect ratio
    entries = [SlideEntry("svs", sample_path(SVS)), SlideEntry("vsi", sample_path(OME_IHC_VSI))]
    report = tile_slides(entries, tmp_path / "out", TilingConfig(patch_size=PATCH, mask_dir=masks))
    svs, vsi = report.results
    assert svs.status == "tiled" and vsi.status == "failed" and "aspect ratio" in vsi.error
    coords, attrs = read_coords(tmp_path / "out" / "coords" / "svs.h5")
    edge = 2967 * (half.shape[0] // 2) / half.shape[0]  # where the painted half ends, level 0
    assert (coords[:, 1] + PATCH / 2 <= edge).all()  # at least half of each patch inside the mask
    rows = [y for y in range(0, 2967 - PATCH + 1, PATCH) if (edge - y) / PATCH >= 0.5]
    assert len(coords) == (2220 // PATCH) * len(rows)  # the whole painted half, glass included
    assert attrs["tissue_source"].endswith("svs_mask.png")


@pytest.mark.parametrize("bad", [{"magnification": 20, "mpp": 0.5}, {"patch_size": 0}, {"overlap": 256},
                                 {"tissue_threshold": 1.5}, {"backend": "pillow"}, {"mpp": -1.0}])
def test_contradictory_settings_raise_config_error(bad):
    with pytest.raises(ConfigError):
        TilingConfig(**bad)
