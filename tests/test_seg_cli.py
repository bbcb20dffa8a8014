"""`mambascope segment train` / `segment predict` end to end on real (subsampled) cases, tiny model."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import torch
import yaml

from mambascope.cli.main import main
from mambascope.train.seg import load_seg_checkpoint
from seg_helpers import write_case, write_dataset

TINY = ["--patch-size", "32", "--base-channels", "4", "--depths", "1,1,1,1", "--d-state", "4",
        "--samples-per-volume", "2", "--val-fraction", "0.34", "--sw-batch-size", "4", "--num-workers", "0",
        "--patience", "0", "--seed", "0"]


def test_train_resume_and_predict(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", n_cases=3)
    args = ["segment", "train", "--data", str(data), "--output-dir", str(tmp_path / "results"), "--run-name", "tiny",
            *TINY]
    assert main([*args, "--epochs", "1"]) == 0
    run = tmp_path / "results" / "tiny"
    for name in ("config.yaml", "splits.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                 "plots/training_curves.png", "plots/val_predictions_epoch_0.png", "metrics/final_metrics.json"):
        assert (run / name).is_file(), name
    assert list((run / "logs").glob("events.out.tfevents.*"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["command"] == "mambascope segment train" and config["patch_size"] == "32"
    splits = json.loads((run / "splits.json").read_text())
    assert (len(splits["train"]), len(splits["val"])) == (2, 1)

    state = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert state["hyper_parameters"]["family"] == "seg"
    model, info = load_seg_checkpoint(run / "checkpoints" / "best.ckpt")
    assert info.patch_size == (32, 32, 32) and info.et_label == 4 and info.regions == ("TC", "WT", "ET")
    assert model.stages[0].gsc.gate.conv.out_channels == 4

    final = json.loads((run / "metrics" / "final_metrics.json").read_text())
    val_case = splits["val"][0]
    (row,) = final["splits"]["val"]["per_case"]
    assert row["case_id"] == val_case and 0 <= row["dice_WT"] <= 1 and row["hd95_WT"] >= 0
    assert "empty" in final["empty_masks"]
    written = nib.load(str(run / "predictions" / "val" / f"{val_case}.nii.gz"))
    np.testing.assert_array_equal(written.affine, nib.load(str(data / val_case / f"{val_case}_t1.nii.gz")).affine)

    # the run exists: training again needs --resume, which continues from last.ckpt
    first_steps = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert main([*args, "--epochs", "2"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * first_steps  # one more epoch, not two
    (report,) = [v for k, v in last["callbacks"].items() if k.startswith("SegRunReport")]
    assert len(report["history"]["train_loss"]) == 2 and len(report["history"]["val_dice_mean"]) == 2

    # predict: one good case (no labels), one missing a modality -> the good one is written, exit 1
    cases = tmp_path / "new"
    write_case(cases, "BraTS2021_00100", stride=4, offset=2, with_label=False)
    broken = write_case(cases, "BraTS2021_00101", stride=4)
    (broken / "BraTS2021_00101_flair.nii.gz").unlink()
    out = tmp_path / "pred"
    capsys.readouterr()
    code = main(["segment", "predict", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--input",
                 str(cases), "--out", str(out), "--no-tta"])
    err = capsys.readouterr().err
    assert code == 1
    assert "BraTS2021_00101" in err and "missing modality flair" in err and "1 of 2 case(s) failed" in err
    written = nib.load(str(out / "BraTS2021_00100.nii.gz"))
    source = nib.load(str(cases / "BraTS2021_00100" / "BraTS2021_00100_t1.nii.gz"))
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)
    assert set(np.unique(np.asanyarray(written.dataobj))) <= {0, 1, 2, 4}
    assert not (out / "metrics.csv").exists()

    # a case with labels gets scored
    shutil.rmtree(broken)
    shutil.copytree(data / val_case, cases / val_case)
    assert main(["segment", "predict", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--input",
                 str(cases), "--out", str(out), "--no-tta"]) == 0
    assert "1 label map(s) written, 1 kept" in capsys.readouterr().out
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(val_case)


def test_bad_checkpoint_is_one_line_error(tmp_path, capsys):
    bogus = tmp_path / "model.ckpt"
    torch.save({"hyper_parameters": {"family": "mil"}, "state_dict": {}}, bogus)
    case_dir = write_case(tmp_path / "in", "c", stride=6, with_label=False)
    assert main(["segment", "predict", "--checkpoint", str(bogus), "--input", str(case_dir),
                 "--out", str(tmp_path / "o")]) == 1
    assert "not a segmentation checkpoint (family 'mil')" in capsys.readouterr().err
