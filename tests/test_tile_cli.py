"""`mambascope tile` through the CLI entry point."""

from __future__ import annotations

import shutil

import pandas as pd
import yaml

from mambascope.cli.main import main
from mambascope.sample_data import sample_path
from mambascope.slides import read_coords
from slides_helpers import OME_IHC_VSI, SVS, truncated_copy


def test_tile_command_writes_outputs_and_config(tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(sample_path(OME_IHC_VSI), slides)
    options = tmp_path / "tile.yaml"
    options.write_text("patch-size: 128\ntissue_threshold: 0.25\n")
    out = tmp_path / "out"
    assert main(["tile", "--config", str(options), "--slides", str(slides), "--out", str(out), "--mpp", "0.5",
                 "--save-patches"]) == 0
    summary = capsys.readouterr().out
    assert "1 tiled" in summary and str(out) in summary
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["patch_size"] == 128 and config["tissue_threshold"] == 0.25 and config["mpp"] == 0.5
    assert config["command"] == "mambascope tile"
    coords, attrs = read_coords(out / "coords" / "OS-2-vsi.h5")
    assert attrs["target_mpp"] == 0.5 and attrs["patch_size"] == 128 and len(coords) > 0
    assert (out / "OS-2-vsi" / "patches" / "OS-2-vsi_patches.h5").is_file()
    assert main(["tile", "--config", str(options), "--slides", str(slides), "--out", str(out), "--mpp", "0.5",
                 "--save-patches"]) == 0
    assert "1 already complete" in capsys.readouterr().out


def test_tile_command_exit_code_when_a_slide_fails(tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(sample_path(OME_IHC_VSI), slides)
    truncated_copy(SVS, slides / "broken.svs", 0.4)
    out = tmp_path / "out"
    assert main(["tile", "--slides", str(slides), "--out", str(out), "--patch-size", "128"]) == 1
    captured = capsys.readouterr()
    assert "failed broken: cannot open slide" in captured.err
    assert "error: 1 of 2 slide(s) failed" in captured.err
    table = pd.read_csv(out / "processed_metadata.csv")
    assert dict(zip(table["slide_id"], table["status"], strict=True)) == {"OS-2-vsi": "tiled", "broken": "failed"}


def test_tile_command_usage_errors(tmp_path, capsys):
    assert main(["tile", "--slides", str(tmp_path), "--out", str(tmp_path / "o"), "--magnification", "20",
                 "--mpp", "0.5"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["tile", "--slides", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert main(["tile", "--slides", str(tmp_path), "--out", str(tmp_path / "o"), "--patch-size", "64",
                 "--overlap", "64"]) == 2
