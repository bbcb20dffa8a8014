"""`mambascope demo` end to end on a reduced cohort: every output exists and is valid."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pandas as pd
import yaml
from PIL import Image

from mambascope.cli.main import main
from mambascope.demo.cohort import build_demo_cohort
from mambascope.slides.reader import open_slide


def test_cohort_is_real_pyramidal_slides_with_splits(tmp_path):
    labels = pd.read_csv(build_demo_cohort(tmp_path, max_per_class=4))
    assert set(labels["label"]) == {"HE", "Ki67"}
    assert (labels.groupby("label").size() == 4).all()
    for split in ("train", "val", "test"):
        assert set(labels.loc[labels["split"] == split, "label"]) == {"HE", "Ki67"}
    # Both H&E sources and both IHC sources are used, so the task is not one image against another.
    assert set(labels["case_id"]) == {"cmu1", "os1", "os2ndpi", "os2vsi"}
    with open_slide(tmp_path / labels.loc[0, "path"]) as slide:
        assert slide.level_count >= 2
        assert slide.mpp is not None and 0.2 < slide.mpp < 0.6
        pixels = slide.read_region((0, 0), 0, slide.dimensions)
        assert pixels.std() > 10  # real tissue texture, not a flat fill


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--slides-per-class", "3"]) == 0
    printed = capsys.readouterr().out
    assert "held-out test slides" in printed and "mamba2d" in printed and "abmil-gated" in printed

    labels = pd.read_csv(out / "cohort" / "labels.csv")
    assert len(labels) == 6
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 1

    for slide_id in labels["slide_id"]:
        with h5py.File(out / "tiles" / "coords" / f"{slide_id}.h5", "r") as f:
            coords = f["coords"][:]
            assert coords.ndim == 2 and coords.shape[1] == 2 and len(coords) > 0
        with h5py.File(out / "features" / f"{slide_id}.h5", "r") as f:
            assert f["features"].shape == (len(coords), 512)
            assert np.isfinite(f["features"][:]).all()

    test_ids = set(labels.loc[labels["split"] == "test", "slide_id"])
    for model in ("abmil-gated", "mamba2d"):
        predictions = pd.read_csv(out / "predictions" / model / "predictions.csv")
        assert set(predictions["slide_id"]) == test_ids
        probabilities = predictions[["prob_HE", "prob_Ki67"]].to_numpy()
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        for slide_id in test_ids:
            with Image.open(out / "predictions" / model / "heatmaps" / f"{slide_id}.png") as image:
                image.load()
                assert image.size[0] > 64 and image.size[1] > 64
        metrics = json.loads((out / "runs" / model / "metrics" / "final_metrics.json").read_text())
        for key in ("accuracy", "balanced_accuracy", "macro_f1"):
            assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0
        assert math.isfinite(metrics["accuracy"])
