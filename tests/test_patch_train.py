"""Training, evaluation and prediction end to end: each model learns H&E vs Ki67 IHC from real patches."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from mambascope.cli.main import main
from mambascope.errors import BatchError, CheckpointError, DataError
from mambascope.train.patch import evaluate_checkpoint, predict_images
from mambascope.train.patch_module import load_patch_checkpoint
from patch_helpers import one_thread, real_patch_samples, write_h5_layout, write_image_folder

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

HISTOMAMBA_ARGS = ["--model", "histomamba-small", "--dims", "16,32", "--depths", "1,1", "--mamba-d-state", "4",
                   "--mamba-expand", "1", "--embed-stride", "4", "--img-size", "32", "--batch-size", "16",
                   "--num-epochs", "4", "--lr", "3e-3", "--num-workers", "0", "--seed", "0",
                   "--val-split", "0.25", "--test-split", "0.25", "--use-weighted-sampler"]


@pytest.fixture(scope="module")
def histomamba_run(tmp_path_factory):
    """One short HistoMamba run through the CLI on the HDF5 layout (shared by the tests below)."""
    root = tmp_path_factory.mktemp("hdf5")
    csv = write_h5_layout(root, per_sample=8)
    out = tmp_path_factory.mktemp("run") / "histomamba"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    code = main(["train", "histomamba", "--data-dir", str(root), "--metadata-csv", str(csv),
                 "--label-col", "tissue_type", "--output-dir", str(out), *HISTOMAMBA_ARGS])
    torch.set_num_threads(previous)
    assert code == 0
    return root, csv, out


def test_histomamba_learns_he_vs_ihc_on_held_out_samples(histomamba_run):
    _, _, out = histomamba_run
    final = json.loads((out / "metrics" / "final_metrics.json").read_text())
    assert final["split"] == "test" and final["n"] == 32  # 2 held-out samples x 2 classes x 8 patches
    assert final["accuracy"] >= 0.9 and final["auc"] >= 0.95
    for path in ("best_model_patch.pth", "checkpoints/best.ckpt", "checkpoints/last.ckpt", "config.yaml",
                 "cli_options.yaml", "plots/test_confusion_matrix.png", "metrics/val_metrics.json"):
        assert (out / path).is_file(), path
    assert list((out / "logs").rglob("events.out.tfevents*"))
    assert len(list((out / "manifest_cache").glob("manifest_*.json"))) == 1

    model, info = load_patch_checkpoint(out / "best_model_patch.pth")
    hp = info.hyper_parameters
    assert hp["family"] == "patch" and info.class_names == ["HE", "IHC"] and info.model_name == "histomamba-small"
    assert info.model_kwargs["dims"] == [16, 32] and hp["lambda_recon"] == 0.05
    splits = hp["data"]["splits"]
    assert not set(splits["train"]) & (set(splits["val"]) | set(splits["test"]))  # split by sample
    lightning = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)
    assert lightning["hyper_parameters"]["family"] == "patch"
    assert all(torch.equal(v, model.state_dict()[k[6:]].cpu()) for k, v in lightning["state_dict"].items()
               if k.startswith("model."))


def final_ids(out):
    return load_patch_checkpoint(out / "best_model_patch.pth")[1].hyper_parameters["data"]["splits"]["test"]


def test_rerun_of_a_finished_run_is_skipped(histomamba_run, capsys):
    root, csv, out = histomamba_run
    before = (out / "best_model_patch.pth").stat().st_mtime_ns
    assert main(["train", "histomamba", "--data-dir", str(root), "--metadata-csv", str(csv),
                 "--label-col", "tissue_type", "--output-dir", str(out), *HISTOMAMBA_ARGS]) == 0
    assert "already complete" in capsys.readouterr().out
    assert (out / "best_model_patch.pth").stat().st_mtime_ns == before


def test_evaluate_checkpoint_on_the_held_out_hdf5_samples(histomamba_run, tmp_path):
    root, _, out = histomamba_run
    metrics = evaluate_checkpoint(out / "best_model_patch.pth", root, tmp_path / "eval", split="test")
    final = json.loads((out / "metrics" / "final_metrics.json").read_text())
    assert metrics["confusion_matrix"] == final["confusion_matrix"]
    assert metrics["accuracy"] == pytest.approx(final["accuracy"])
    assert (tmp_path / "eval" / "plots" / "test_roc.png").is_file()
    rows = pd.read_csv(tmp_path / "eval" / "metrics" / "test_predictions.csv")
    assert len(rows) == 32 and (rows["label"] == rows["predicted_label"]).mean() == pytest.approx(final["accuracy"])
    assert rows["image"][0].split(":")[0] in final_ids(out)
    assert main(["evaluate", "--checkpoint", str(out / "checkpoints" / "best.ckpt"), "--data-root", str(root),
                 "--out", str(tmp_path / "cli")]) == 0
    cli = json.loads((tmp_path / "cli" / "metrics" / "test_metrics.json").read_text())
    assert cli["confusion_matrix"] == final["confusion_matrix"]
    with pytest.raises(DataError, match="held out no samples as 'extra'"):
        evaluate_checkpoint(out / "best_model_patch.pth", root, tmp_path / "e2", split="extra")
    with pytest.raises(DataError, match="none of the 16 ids"):
        evaluate_checkpoint(out / "best_model_patch.pth", tmp_path / "eval", tmp_path / "e3", split="test")


def test_predict_on_hdf5_and_image_folder_with_an_ensemble(histomamba_run, tmp_path):
    root, _, out = histomamba_run
    _, info = load_patch_checkpoint(out / "best_model_patch.pth")
    test_ids = info.hyper_parameters["data"]["splits"]["test"]
    ihc = next(s for s in test_ids if s.startswith("OS2"))
    h5 = root / ihc / "patches" / f"{ihc}_patches.h5"
    csv = predict_images([out / "best_model_patch.pth"], h5, tmp_path / "h5", batch_size=5)
    table = pd.read_csv(csv)
    assert len(table) == 8 and table["index"].tolist() == list(range(8))
    assert table["image"][0] == f"{h5.name}:0"
    assert (table["predicted_label"] == "IHC").mean() >= 0.75
    np.testing.assert_allclose(table["prob_HE"] + table["prob_IHC"], 1.0, atol=1e-5)

    # the same patches as PNG files give the same probabilities; two copies of one model average to it
    folder = tmp_path / "pngs"
    folder.mkdir()
    import cv2

    with h5py.File(h5) as handle:
        for i, patch in enumerate(handle["data"][:]):
            cv2.imwrite(str(folder / f"p{i}.png"), cv2.cvtColor(patch, cv2.COLOR_RGB2BGR))
    ensemble = [out / "best_model_patch.pth", out / "checkpoints" / "best.ckpt"]
    folder_csv = pd.read_csv(predict_images(ensemble, folder, tmp_path / "png", batch_size=4))
    assert folder_csv["image"].tolist() == [f"p{i}.png" for i in range(8)]
    np.testing.assert_allclose(folder_csv["prob_IHC"], table["prob_IHC"], atol=1e-4)

    # a broken image is reported after the others are written
    (folder / "zz_broken.png").write_bytes(b"not a png")
    with pytest.raises(BatchError, match="1 of 9 images"):
        predict_images([out / "best_model_patch.pth"], folder, tmp_path / "broken")
    assert len(pd.read_csv(tmp_path / "broken" / "predictions.csv")) == 8


def test_predict_cli_and_bad_checkpoints(histomamba_run, tmp_path, capsys):
    root, _, out = histomamba_run
    sample = next((root).glob("*/patches/*_patches.h5"))
    assert main(["predict", "--checkpoint", str(out / "best_model_patch.pth"), "--images", str(sample),
                 "--out", str(tmp_path / "cli")]) == 0
    assert len(pd.read_csv(tmp_path / "cli" / "predictions.csv")) == 8
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_patch_checkpoint(junk)
    torch.save({"hyper_parameters": {"family": "mil"}, "state_dict": {}}, tmp_path / "mil.ckpt")
    with pytest.raises(CheckpointError, match="family 'mil'"):
        load_patch_checkpoint(tmp_path / "mil.ckpt")
    with pytest.raises(DataError, match="no image files"):
        predict_images([out / "best_model_patch.pth"], tmp_path / "cli", tmp_path / "p")


def test_microscopic_mamba_learns_from_an_image_folder_with_dataset_stats(tmp_path):
    root = write_image_folder(tmp_path / "folder", per_sample=8)
    assert main(["stats", str(root)]) == 0
    stats = json.loads((root / "stats.json").read_text())
    out = tmp_path / "mm"
    assert main(["train", "microscopic-mamba", "--data-dir", str(root), "--output-dir", str(out),
                 "--dims", "16,32", "--depths", "1,1", "--d-state", "4", "--img-size", "32",
                 "--batch-size", "16", "--num-epochs", "4", "--warmup-epochs", "1", "--lr", "3e-3",
                 "--num-workers", "0", "--seed", "0", "--monitor-metric", "val_accuracy"]) == 0
    final = json.loads((out / "metrics" / "final_metrics.json").read_text())
    assert final["split"] == "test" and final["n"] == 32
    assert final["accuracy"] >= 0.9
    _, info = load_patch_checkpoint(out / "best_model_patch.pth")
    assert info.transform.mean == pytest.approx(stats["mean"]) and info.transform.recipe == "microscopy"
    assert info.hyper_parameters["optimizer"]["name"] == "adam"  # the paper's recipe is the default
    metrics = evaluate_checkpoint(out / "best_model_patch.pth", root, tmp_path / "eval")
    assert metrics["accuracy"] == pytest.approx(final["accuracy"])
    assert np.sum(metrics["confusion_matrix"]) == 32


def test_training_bad_input_fails_with_one_line(tmp_path, capsys):
    root = write_h5_layout(tmp_path / "h5", per_sample=2).parent
    pd.DataFrame({"id": ["nobody"], "tissue_type": ["HE"]}).to_csv(tmp_path / "meta.csv", index=False)
    code = main(["train", "histomamba", "--data-dir", str(root), "--metadata-csv", str(tmp_path / "meta.csv"),
                 "--label-col", "tissue_type", "--output-dir", str(tmp_path / "run")])
    assert code == 1 and "none of the 1 ids" in capsys.readouterr().err
    one_class = pd.DataFrame({"id": [s for s, label, _ in real_patch_samples(2) if label == "HE"],
                              "tissue_type": "HE"})
    one_class.to_csv(tmp_path / "he.csv", index=False)
    code = main(["train", "histomamba", "--data-dir", str(root), "--metadata-csv", str(tmp_path / "he.csv"),
                 "--label-col", "tissue_type", "--output-dir", str(tmp_path / "run2")])
    assert code == 1 and "at least two classes" in capsys.readouterr().err
    folder = write_image_folder(tmp_path / "folder", per_sample=2)
    (folder / "val" / "Other").mkdir()
    code = main(["train", "microscopic-mamba", "--data-dir", str(folder), "--output-dir", str(tmp_path / "run3")])
    assert code == 1 and "Other are not among the classes" in capsys.readouterr().err
