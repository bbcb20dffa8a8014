"""Streaming extraction on the real Aperio SVS: exactness, resume, shards, precision, bad input."""

from __future__ import annotations

import csv
import os
import warnings

import h5py
import numpy as np
import openslide
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from features_helpers import TINY_BACKBONE, corrupt_tile_copy, grid, make_slide_set, write_slide_coords
from mambascope.cli.main import main
from mambascope.errors import ConfigError
from mambascope.features.backbones import create_backbone
from mambascope.features.pipeline import ExtractionSettings, extract_features
from mambascope.features.sharding import Shard, parse_shard, resolve_shard, select_shard
from mambascope.features.store import read_features
from mambascope.sample_data import sample_path
from mambascope.slides.reader import file_fingerprint


def _backbone(name: str = TINY_BACKBONE):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return create_backbone(name, "none", seed=0)


def _status(path):
    with open(path, newline="") as handle:
        return {row["slide_id"]: row for row in csv.DictReader(handle)}


def test_pipeline_equals_direct_forward_on_independently_read_patches(tmp_path):
    slides, tiles = make_slide_set(tmp_path, ["cmu"], patches_per_slide=21)
    backbone = _backbone()
    # batch 8 over 21 patches: two full batches and a short one, read by two worker processes
    report = extract_features(slides, tiles, tmp_path / "features", backbone,
                              ExtractionSettings(batch_size=8, workers=2), show_progress=False)
    assert report.counts == {"done": 1, "skipped": 0, "failed": 0}
    bag = read_features(tmp_path / "features" / "cmu.h5")
    coords = grid(21)
    assert np.array_equal(bag.coords, coords)
    assert bag.features.shape == (21, backbone.feature_dim) and bag.features.dtype == np.float32
    assert bag.attrs["encoder"] == TINY_BACKBONE and bag.attrs["weights"] == "none"
    assert bag.attrs["transform"]["resize"] == 160 and bag.coords_attrs["patch_size_level0"] == 256

    # reference: OpenSlide directly, torchvision resize + normalise, one forward pass of a fresh backbone
    reference = _backbone()
    with openslide.OpenSlide(str(slides / "cmu.svs")) as slide:
        pixels = np.stack([np.asarray(slide.read_region((int(x), int(y)), 0, (256, 256)).convert("RGB"))
                           for x, y in coords])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    x = TF.resize(x, [160, 160], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    x = TF.normalize(x, mean=list(reference.mean), std=list(reference.std))
    with torch.no_grad():
        expected = reference.module(x).numpy()
    # fp32 on CPU; the only differences are summation order across batch sizes: tolerance 1e-4
    np.testing.assert_allclose(bag.features, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(expected[0] - expected[1]).max() > 1e-2  # different patches give different features


def test_resume_redoes_only_missing_or_broken_outputs(tmp_path):
    slides, tiles = make_slide_set(tmp_path, ["a", "b", "c"], patches_per_slide=5)
    backbone, out = _backbone(), tmp_path / "features"
    settings = ExtractionSettings(batch_size=4, workers=0)
    first = extract_features(slides, tiles, out, backbone, settings, show_progress=False)
    assert first.counts == {"done": 3, "skipped": 0, "failed": 0}
    before = {s: read_features(out / f"{s}.h5").features for s in "abc"}
    assert not np.allclose(before["a"], before["b"])
    stamps = {s: os.stat(out / f"{s}.h5").st_mtime_ns for s in "abc"}
    (out / "b.h5").unlink()
    (out / "c.h5").write_bytes(b"half-written junk")  # a broken output counts as missing
    (out / "a.h5.tmp").write_bytes(b"left over by a killed run")
    second = extract_features(slides, tiles, out, backbone, settings, show_progress=False)
    status = {o.slide_id: o.status for o in second.outcomes}
    assert status == {"a": "skipped", "b": "done", "c": "done"}
    assert os.stat(out / "a.h5").st_mtime_ns == stamps["a"]
    for s in "abc":
        np.testing.assert_array_equal(read_features(out / f"{s}.h5").features, before[s])
    # a complete file from another encoder is not silently reused or overwritten
    other = _backbone("timm:test_convnext")
    third = extract_features(slides, tiles, out, other, settings, show_progress=False)
    assert third.counts["failed"] == 3 and "already holds features from encoder timm:test_vit" in third.failed[0].error


def test_shards_split_slides_disjointly_and_cover_all(tmp_path, monkeypatch):
    ids = ["s0", "s1", "s2", "s3", "s4"]
    slides, tiles = make_slide_set(tmp_path, ids, patches_per_slide=2)
    out = tmp_path / "features"
    for key in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    done = []
    for index in (0, 1):
        code = main(["features", "--coords", str(tiles), "--slides", str(slides), "--out", str(out),
                     "--backbone", TINY_BACKBONE, "--weights", "none", "--workers", "0", "--batch-size", "4",
                     "--shard", f"{index}/2"])
        assert code == 0
        rows = _status(out / f"features_status.shard-{index}-of-2.csv")
        assert all(r["status"] == "done" for r in rows.values())
        done.append(set(rows))
        assert (out / f"config.shard-{index}-of-2.yaml").is_file()
    assert done[0].isdisjoint(done[1]) and done[0] | done[1] == set(ids)
    assert sorted(p.stem for p in out.glob("*.h5")) == ids


def test_shard_resolution_from_slurm_and_torchrun_environment():
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert resolve_shard(None, env) == (Shard(2, 4), 0)
    env.update({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    shard, local_rank = resolve_shard(None, env)
    assert shard == Shard(5, 8) and local_rank == 1
    assert resolve_shard("0/3", {"RANK": "2", "WORLD_SIZE": "4"}) == (Shard(2, 12), 0)
    # every item lands in exactly one of the shards of an 8-way split
    items = [f"slide{i:02d}" for i in range(19)]
    parts = [select_shard(items, Shard(i, 8), key=str) for i in range(8)]
    assert sorted(item for part in parts for item in part) == items and max(map(len, parts)) - min(map(len, parts)) <= 1
    for bad in ("3/3", "1-4", "a/b", "-1/2"):
        with pytest.raises(ConfigError):
            parse_shard(bad)


def test_bf16_autocast_is_close_to_fp32(tmp_path):
    slides, tiles = make_slide_set(tmp_path, ["cmu"], patches_per_slide=6)
    backbone = _backbone()
    bags = {}
    for precision in ("fp32", "bf16"):
        settings = ExtractionSettings(batch_size=6, workers=0, precision=precision)
        extract_features(slides, tiles, tmp_path / precision, backbone, settings, show_progress=False)
        bags[precision] = read_features(tmp_path / precision / "cmu.h5")
    fp32, bf16 = bags["fp32"].features, bags["bf16"].features
    assert bags["bf16"].attrs["precision"] == "bf16"
    assert np.abs(fp32 - bf16).max() > 0  # bf16 really ran
    cosine = (fp32 * bf16).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    assert cosine.min() > 0.99
    assert np.abs(fp32 - bf16).max() < 0.1 * np.abs(fp32).max()


def test_bad_inputs_are_recorded_per_slide_and_the_rest_finish(tmp_path, capsys):
    slides, tiles = make_slide_set(tmp_path, ["good", "swapped"], patches_per_slide=3)
    # coords of "swapped" claim to come from another file; "lost" has no coords file at all
    other_file = file_fingerprint(sample_path("OS-2-vsi.ome.tif"))
    write_slide_coords(slides / "good.svs", tiles / "coords" / "swapped.h5", grid(3), fingerprint=other_file)
    (slides / "lost.svs").symlink_to(slides / "good.svs")
    out = tmp_path / "features"
    code = main(["features", "--coords", str(tiles / "coords"), "--slides", str(slides), "--out", str(out),
                 "--backbone", TINY_BACKBONE, "--weights", "none", "--workers", "0", "--batch-size", "2"])
    assert code == 1
    status = _status(out / "features_status.csv")
    assert status["good"]["status"] == "done" and (out / "good.h5").is_file()
    assert status["swapped"]["status"] == "failed" and "different file" in status["swapped"]["error"]
    assert str(tiles / "coords" / "swapped.h5") in status["swapped"]["error"]
    assert status["lost"]["status"] == "failed" and "coordinates file not found" in status["lost"]["error"]
    assert not (out / "swapped.h5").exists() and not list(out.glob("*.tmp"))
    err = capsys.readouterr().err
    assert "2 of 3 slides failed" in err and "warning: backbone" in err


def test_weights_file_of_another_architecture_fails_the_command_naming_it(tmp_path, capsys):
    slides, tiles = make_slide_set(tmp_path, ["cmu"], patches_per_slide=1)
    weights = tmp_path / "convnext_weights.pth"
    torch.save(_backbone("timm:test_convnext").module.state_dict(), weights)
    code = main(["features", "--coords", str(tiles), "--slides", str(slides), "--out", str(tmp_path / "f"),
                 "--backbone", TINY_BACKBONE, "--weights", str(weights)])
    assert code == 1
    err = capsys.readouterr().err
    assert "does not fit backbone timm:test_vit" in err and "convnext_weights.pth" in err


def test_unreadable_tile_fails_the_slide_or_is_zero_filled_on_request(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    x, y = corrupt_tile_copy(slides / "broken.svs", tile_index=40)
    coords = np.array([[0, 0], [256, 0], [x, y], [512, 0], [768, 0]], dtype=np.int64)
    tiles = tmp_path / "tiles"
    write_slide_coords(slides / "broken.svs", tiles / "coords" / "broken.h5", coords)
    backbone = _backbone()
    settings = ExtractionSettings(batch_size=8, workers=0)
    failed = extract_features(slides, tiles, tmp_path / "strict", backbone, settings, show_progress=False)
    assert failed.counts["failed"] == 1 and "unreadable tile at level-0" in failed.failed[0].error
    assert not (tmp_path / "strict" / "broken.h5").exists()

    lenient = ExtractionSettings(batch_size=8, workers=0, zero_fill_unreadable=True)
    done = extract_features(slides, tiles, tmp_path / "lenient", backbone, lenient, show_progress=False)
    assert done.counts["done"] == 1 and done.outcomes[0].zero_filled == 1
    bag = read_features(tmp_path / "lenient" / "broken.h5")
    assert bag.attrs["zero_filled"] == [2] and not bag.features[2].any()
    # the readable tiles after the bad one are real features (a fresh handle is opened after the error)
    intact_slides, intact_tiles = make_slide_set(tmp_path / "intact", ["ok"], patches_per_slide=1)
    write_slide_coords(intact_slides / "ok.svs", intact_tiles / "coords" / "ok.h5", coords)
    extract_features(intact_slides, intact_tiles, tmp_path / "ref", backbone, settings, show_progress=False)
    reference = read_features(tmp_path / "ref" / "ok.h5").features
    np.testing.assert_allclose(bag.features[[0, 1, 3, 4]], reference[[0, 1, 3, 4]], rtol=1e-5, atol=1e-5)
    with h5py.File(tmp_path / "lenient" / "broken.h5") as handle:  # CLAM-style reading works on our files
        assert handle["features"].shape == (5, backbone.feature_dim) and handle["coords"].shape == (5, 2)
