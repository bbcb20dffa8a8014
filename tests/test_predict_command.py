"""`mambascope predict` and `predict_slides` on features of the real SVS, with tiny MIL checkpoints."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mambascope.cli.main import main
from mambascope.cli.predict import spread_variadic
from mambascope.errors import BatchError, CheckpointError, ConfigError, DataError
from mambascope.eval.predict_mil import load_ensemble, predict_slides, read_scores
from predict_helpers import SVS_SIZE, TINY_KWARGS, make_checkpoint, model_output, svs_path, write_bags

CLASSES = ["normal", "tumor"]
IN_DIM = 8


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Features of three slides on the SVS grid; a CSV naming the SVS for two, a missing file for one."""
    root = tmp_path_factory.mktemp("predict")
    bags = write_bags(root / "features", ["slide_a", "slide_b", "orphan"], IN_DIM)
    pd.DataFrame({"slide_id": ["slide_a", "slide_b", "orphan"],
                  "path": [str(svs_path()), str(svs_path()), str(root / "gone.svs")],
                  "label": ["tumor", "normal", "tumor"]}).to_csv(root / "slides.csv", index=False)
    checkpoints = [make_checkpoint(root / f"ck{seed}.ckpt", "abmil", IN_DIM, CLASSES, seed=seed) for seed in (0, 1)]
    return root, bags, checkpoints


def test_command_equals_model_output_in_python(workspace, capsys):
    root, bags, (checkpoint, _) = workspace
    out = root / "single"
    args = ["predict", "--checkpoint", str(checkpoint), "--features", str(root / "features"), "--slides",
            str(root / "slides.csv"), "--out", str(out), "--heatmaps", "--top-k", "2", "--thumbnail-size", "300"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "orphan: pictures skipped" in err and "gone.svs" in err

    table = pd.read_csv(out / "predictions.csv").set_index("slide_id")
    assert list(table.columns) == ["num_patches", "predicted", "prob_normal", "prob_tumor", "label"]
    for slide_id, (features, coords) in bags.items():
        probs, scores = model_output(checkpoint, features, coords)
        np.testing.assert_allclose(table.loc[slide_id, ["prob_normal", "prob_tumor"]].to_numpy(float), probs,
                                   atol=1e-6)
        assert table.loc[slide_id, "predicted"] == CLASSES[int(np.argmax(probs))]
        assert table.loc[slide_id, "num_patches"] == len(coords)
        # per-patch scores, also for the slide whose file is missing
        np.testing.assert_allclose(np.load(out / "scores" / f"{slide_id}.npy"), scores, atol=1e-6)
        saved_scores, saved_coords, attrs = read_scores(out / "scores" / f"{slide_id}.h5")
        np.testing.assert_allclose(saved_scores, scores, atol=1e-6)
        assert np.array_equal(saved_coords, coords) and attrs["slide_id"] == slide_id
        assert attrs["class_names"] == CLASSES and attrs["checkpoints"] == [str(checkpoint)]

    assert not (out / "heatmaps" / "orphan.png").exists()
    for slide_id in ("slide_a", "slide_b"):
        heat = Image.open(out / "heatmaps" / f"{slide_id}.png")
        assert heat.size[1] == 300 and heat.size[0] > round(300 * SVS_SIZE[0] / SVS_SIZE[1])  # map + colour bar
        assert Image.open(out / "galleries" / f"{slide_id}.png").size[0] > 2 * 256

    # metrics of the labelled slides, as the evaluate command computes them
    metrics = pd.read_json(out / "metrics.json", typ="series")
    truth = table["label"] == table["predicted"]
    assert metrics["n"] == 3 and metrics["accuracy"] == pytest.approx(truth.mean())
    assert (out / "plots" / "confusion_matrix.png").is_file() and (out / "config.yaml").is_file()


def test_ensemble_averages_members(workspace, tmp_path):
    root, bags, checkpoints = workspace
    report = predict_slides(checkpoints, root / "features", tmp_path, heatmaps=True)
    assert not report.failures and len(report.predicted) == 3
    for outcome in report.predicted:
        features, coords = bags[outcome.slide_id]
        members = [model_output(c, features, coords) for c in checkpoints]
        np.testing.assert_allclose(outcome.probs, np.mean([p for p, _ in members], axis=0), atol=1e-6)
        assert not np.allclose(members[0][0], members[1][0])  # the members really differ
        with h5py.File(tmp_path / "scores" / f"{outcome.slide_id}.h5") as handle:
            np.testing.assert_allclose(handle["scores"][()], np.mean([s for _, s in members], axis=0), atol=1e-6)
            assert handle["scores_per_model"].shape == (2, len(coords))
    # without --slides there are scores but no pictures
    assert (tmp_path / "scores" / "slide_a.npy").is_file() and not (tmp_path / "heatmaps").exists()


@pytest.mark.parametrize("model_name", sorted(TINY_KWARGS))
def test_every_mil_model_predicts_and_draws(model_name, workspace, tmp_path):
    root, bags, _ = workspace
    checkpoint = make_checkpoint(tmp_path / "model.ckpt", model_name, IN_DIM, CLASSES)
    report = predict_slides([checkpoint], root / "features", tmp_path / "out", slides=root / "slides.csv",
                            heatmaps=True, top_k=1, thumbnail_size=128)
    assert [o.slide_id for o in report.failures] == []
    features, coords = bags["slide_a"]
    probs, scores = model_output(checkpoint, features, coords)
    outcome = next(o for o in report.outcomes if o.slide_id == "slide_a")
    np.testing.assert_allclose(outcome.probs, probs, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "scores" / "slide_a.npy"), scores, atol=1e-6)
    assert (tmp_path / "out" / "heatmaps" / "slide_a.png").is_file()


def test_class_names_rename_and_must_match_the_checkpoint(workspace, tmp_path, capsys):
    root, _, (checkpoint, _) = workspace
    base = ["predict", "--checkpoint", str(checkpoint), "--features", str(root / "features"), "--out"]
    assert main([*base, str(tmp_path / "a"), "--class-names", "benign", "malignant"]) == 0
    table = pd.read_csv(tmp_path / "a" / "predictions.csv")
    assert {"prob_benign", "prob_malignant"} <= set(table.columns)
    assert set(table["predicted"]) <= {"benign", "malignant"}

    assert main([*base, str(tmp_path / "b"), "--class-names", "x", "y", "z"]) == ConfigError.exit_code
    assert "3 class names given (x, y, z) but the checkpoint predicts 2 classes" in capsys.readouterr().err
    assert not (tmp_path / "b" / "predictions.csv").exists()


def test_spread_variadic_options():
    assert spread_variadic(["--class-names", "A", "B", "--out", "o"]) == [
        "--class-names", "A", "--class-names", "B", "--out", "o"]


def test_bad_slides_are_recorded_and_the_rest_written(workspace, tmp_path):
    _, _, (checkpoint, _) = workspace
    features = tmp_path / "features"
    write_bags(features, ["good"], IN_DIM)
    write_bags(features, ["wide"], IN_DIM + 4)  # features of another encoder
    # a slide whose features were computed on a slide of another size: the picture would be misplaced
    bags = write_bags(features, ["moved"], IN_DIM)
    with h5py.File(features / "moved.h5", "r+") as handle:
        handle["coords"].attrs["level0_width"] = 5000
    pd.DataFrame({"slide_id": ["good", "wide", "moved", "absent"], "path": [str(svs_path())] * 4}).to_csv(
        tmp_path / "slides.csv", index=False)
    messages = []
    report = predict_slides([checkpoint], features, tmp_path / "out", slides=tmp_path / "slides.csv",
                            heatmaps=True, top_k=1, thumbnail_size=128, notify=messages.append)
    failed = {o.slide_id: o.error for o in report.failures}
    assert set(failed) == {"wide", "absent"}
    assert "dimension 12 but the checkpoint expects 8" in failed["wide"]
    assert "no features file" in failed["absent"]
    table = pd.read_csv(report.predictions_csv)
    assert sorted(table["slide_id"]) == ["good", "moved"]
    moved = next(o for o in report.outcomes if o.slide_id == "moved")
    assert "5000x2967" in moved.pictures_note and (tmp_path / "out" / "scores" / "moved.npy").is_file()
    assert not (tmp_path / "out" / "heatmaps" / "moved.png").exists()
    assert (tmp_path / "out" / "heatmaps" / "good.png").is_file()
    assert any("moved: pictures skipped" in m for m in messages)
    assert len(bags["moved"][1]) == len(np.load(tmp_path / "out" / "scores" / "moved.npy"))
    with pytest.raises(BatchError, match="2 of 4 slides failed"):
        report.raise_for_failures()
    # the command exits non-zero after writing what it could
    args = ["predict", "--checkpoint", str(checkpoint), "--features", str(features), "--slides",
            str(tmp_path / "slides.csv"), "--out", str(tmp_path / "cli")]
    assert main(args) == BatchError.exit_code
    assert len(pd.read_csv(tmp_path / "cli" / "predictions.csv")) == 2


def test_rerun_keeps_up_to_date_pictures_and_redraws_broken_ones(workspace, tmp_path):
    root, _, (checkpoint, _) = workspace
    kwargs = {"slides": root / "slides.csv", "heatmaps": True, "top_k": 1, "thumbnail_size": 128}
    predict_slides([checkpoint], root / "features", tmp_path, **kwargs)
    heat = tmp_path / "heatmaps" / "slide_b.png"
    heat.write_bytes(heat.read_bytes()[:100])  # truncated
    report = predict_slides([checkpoint], root / "features", tmp_path, **kwargs)
    notes = {o.slide_id: o.pictures_note for o in report.outcomes}
    assert notes["slide_a"] == "pictures up to date (kept)" and notes["slide_b"] is None
    assert Image.open(heat).size[1] == 128
    # another colour map invalidates the kept pictures
    report = predict_slides([checkpoint], root / "features", tmp_path, cmap="viridis", **kwargs)
    assert next(o for o in report.outcomes if o.slide_id == "slide_a").pictures_note is None


def test_labels_csv_without_paths_gives_metrics_for_one_split(workspace, tmp_path):
    root, bags, (checkpoint, _) = workspace
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": ["slide_a", "slide_b", "orphan"], "label": ["1", "0", "1"],
                  "split": ["test", "test", "train"]}).to_csv(labels, index=False)
    messages = []
    report = predict_slides([checkpoint], root / "features", tmp_path / "out", slides=labels, split="test",
                            heatmaps=True, notify=messages.append)
    assert [o.slide_id for o in report.predicted] == ["slide_a", "slide_b"]
    probs = np.stack([model_output(checkpoint, *bags[s])[0] for s in ("slide_a", "slide_b")])
    expected_accuracy = np.mean(probs.argmax(1) == np.array([1, 0]))
    assert report.metrics["n"] == 2 and report.metrics["accuracy"] == pytest.approx(expected_accuracy)
    assert all(o.pictures_note == "no slide file for this slide in --slides" for o in report.predicted)
    assert (tmp_path / "out" / "scores" / "slide_b.h5").is_file()
    with pytest.raises(DataError, match="no slide of split 'val'"):
        predict_slides([checkpoint], root / "features", tmp_path / "out", slides=labels, split="val")


def test_ensemble_refuses_checkpoints_of_other_classes(workspace, tmp_path):
    _, _, (checkpoint, _) = workspace
    other = make_checkpoint(tmp_path / "three.ckpt", "abmil", IN_DIM, ["a", "b", "c"])
    with pytest.raises(CheckpointError, match="3 classes"):
        load_ensemble([checkpoint, other])


def test_patch_checkpoints_go_to_the_patch_predictor(tmp_path, monkeypatch, capsys):
    import torch

    import mambascope.train.patch as patch

    checkpoint = tmp_path / "patch.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"family": "patch"}}, checkpoint)
    images = tmp_path / "images"
    images.mkdir()
    calls = []

    def fake_predict_images(checkpoints, images_path, out_dir, batch_size):
        calls.append((list(checkpoints), images_path, out_dir, batch_size))
        return out_dir / "predictions.csv"

    monkeypatch.setattr(patch, "predict_images", fake_predict_images)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(out)]) == ConfigError.exit_code
    assert "needs --images" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out),
                 "--batch-size", "8"]) == 0
    assert calls == [([checkpoint], images, out, 8)]


def test_pipeline_from_real_tiling_checks_the_slide_file(tmp_path, capsys):
    """Coordinates from `mambascope tile` on the SVS: pictures drawn for it, refused for another slide."""
    from mambascope.features.store import write_features
    from mambascope.sample_data import sample_path
    from mambascope.slides.coords_store import read_coords

    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "CMU-1-Small-Region.svs").symlink_to(svs_path())
    assert main(["tile", "--slides", str(slides), "--out", str(tmp_path / "tiles"), "--magnification", "10",
                 "--patch-size", "128"]) == 0
    coords, attrs = read_coords(tmp_path / "tiles" / "coords" / "CMU-1-Small-Region.h5")
    features = np.random.default_rng(5).normal(size=(len(coords), IN_DIM)).astype(np.float32)
    write_features(tmp_path / "features" / "CMU-1-Small-Region.h5", features, coords, attrs,
                   {"encoder": "test", "weights": "random", "precision": "fp32", "transform": "none"})
    checkpoint = make_checkpoint(tmp_path / "ck.ckpt", "mamba2d", IN_DIM, CLASSES)
    args = ["predict", "--checkpoint", str(checkpoint), "--features", str(tmp_path / "features"),
            "--heatmaps", "--top-k", "3", "--thumbnail-size", "256"]
    assert main([*args, "--slides", str(slides), "--out", str(tmp_path / "ok")]) == 0
    gallery = np.asarray(Image.open(tmp_path / "ok" / "galleries" / "CMU-1-Small-Region.png"))
    assert gallery.shape[1] == 3 * (128 + 4) + 4  # three 128-px tiles: read at the model's resolution
    assert Image.open(tmp_path / "ok" / "heatmaps" / "CMU-1-Small-Region.png").size[1] == 256

    # another slide file under the same id: predictions yes, pictures refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "CMU-1-Small-Region.tif").symlink_to(sample_path("OS-1-detail.ome.tif"))
    capsys.readouterr()
    assert main([*args, "--slides", str(other), "--out", str(tmp_path / "wrong")]) == 0
    assert "computed on a 2220x2967 slide" in capsys.readouterr().err
    assert (tmp_path / "wrong" / "predictions.csv").is_file()
    assert not (tmp_path / "wrong" / "heatmaps" / "CMU-1-Small-Region.png").exists()
