"""`mambascope train mil` / `evaluate`: run directories, k-fold, resume, checkpoints, bad input, DDP."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mambascope.cli.main import main
from mambascope.errors import CheckpointError, ConfigError, DataError
from mambascope.features.store import write_features
from mambascope.train.mil import MILTrainConfig, evaluate_mil, load_mil_checkpoint, train_mil
from mil_helpers import SMALL, planted_dataset, single_thread  # noqa: F401  (autouse fixture)

TINY = {**SMALL["abmil-gated"], "dropout": 0.0}


def _config(features, labels, out, **overrides) -> MILTrainConfig:
    values = {"model": "abmil-gated", "model_args": TINY, "epochs": 2, "lr": 2e-3, "accelerator": "cpu",
              "devices": "1", "progress_bar": False, "patience": 0}
    return MILTrainConfig(features=features, labels=labels, out=out, **{**values, **overrides})


def test_train_cli_writes_run_directory_and_evaluate_reproduces_it(tmp_path):
    features, labels, _ = planted_dataset(tmp_path, n_slides=24, patches=(10, 20))
    config = tmp_path / "mil.yaml"
    config.write_text(yaml.safe_dump({"model": "abmil-gated", "model_args": TINY, "epochs": 3, "lr": 3e-3,
                                      "accelerator": "cpu", "devices": "1", "monitor": "val_auc"}))
    run = tmp_path / "run"
    assert main(["train", "mil", "--config", str(config), "--features", str(features), "--labels", str(labels),
                 "--out", str(run), "--no-progress-bar"]) == 0
    for name in ("config.yaml", "checkpoints/best.ckpt", "checkpoints/last.ckpt", "metrics/final_metrics.json",
                 "metrics/predictions.csv", "plots/confusion_matrix.png", "plots/roc.png"):
        assert (run / name).is_file(), name
    assert list((run / "logs").glob("events.out.tfevents.*"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["epochs"] == 3 and saved["monitor"] == "val_auc" and saved["model_args"] == TINY
    metrics = json.loads((run / "metrics" / "final_metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n"] == 6 and metrics["class_names"] == ["normal", "tumor"]
    assert {"accuracy", "balanced_accuracy", "macro_f1", "auc", "per_class_accuracy", "confusion_matrix"} <= set(metrics)

    raw = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    hp = raw["hyper_parameters"]
    assert (hp["family"], hp["model_name"], hp["in_dim"], hp["class_names"]) == ("mil", "abmil-gated", 32,
                                                                                 ["normal", "tumor"])
    model, info = load_mil_checkpoint(run / "checkpoints" / "best.ckpt")
    assert not model.training and info.model_kwargs == TINY

    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--features", str(features),
                 "--labels", str(labels), "--out", str(out)]) == 0
    again = json.loads((out / "metrics" / "final_metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auc"):
        assert again[key] == pytest.approx(metrics[key]), key
    assert again["confusion_matrix"] == metrics["confusion_matrix"] and again["n"] == metrics["n"]
    assert (out / "plots" / "roc.png").is_file()


def test_kfold_with_common_test_set_trains_folds_and_ensembles(tmp_path):
    features, labels, _ = planted_dataset(tmp_path, n_slides=30, patches=(8, 16), case_ids=True,
                                          splits=(0.5, 0.3))  # 15 train, 9 val, 6 test rows
    result = train_mil(_config(features, labels, tmp_path / "cv", folds=3))
    assert [p.name for p in result.fold_dirs] == ["fold_0", "fold_1", "fold_2"]
    for fold in result.fold_dirs:
        fold_metrics = json.loads((fold / "metrics" / "final_metrics.json").read_text())
        assert fold_metrics["split"] == "test" and fold_metrics["n"] == 6
        assert fold_metrics["n_train"] + fold_metrics["n_val"] == 24
    table = pd.read_csv(tmp_path / "cv" / "metrics" / "folds.csv", index_col="fold")
    assert list(table.index) == ["fold_0", "fold_1", "fold_2", "mean", "std"]
    assert table.loc["mean", "accuracy"] == pytest.approx(table.iloc[:3]["accuracy"].mean())
    assert "±" in (tmp_path / "cv" / "metrics" / "folds.md").read_text()
    assert result.metrics["evaluated"].startswith("ensemble of 3")
    # the ensemble is the mean of the fold models' probabilities
    ensemble = pd.read_csv(tmp_path / "cv" / "metrics" / "predictions.csv")
    folds = [pd.read_csv(f / "metrics" / "predictions.csv") for f in result.fold_dirs]
    expected = np.mean([f["prob_tumor"].to_numpy() for f in folds], axis=0)
    np.testing.assert_allclose(ensemble["prob_tumor"].to_numpy(), expected, rtol=1e-5)
    # the same ensemble through `evaluate` with several checkpoints
    metrics = evaluate_mil([f / "checkpoints" / "best.ckpt" for f in result.fold_dirs], features, labels,
                           tmp_path / "ens")
    assert metrics["accuracy"] == pytest.approx(result.metrics["accuracy"])


def test_kfold_without_test_rows_tests_every_slide_once(tmp_path):
    features, labels, _ = planted_dataset(tmp_path, n_slides=18, patches=(8, 12), splits=None, case_ids=True)
    result = train_mil(_config(features, labels, tmp_path / "cv", folds=3, epochs=1))
    assert result.metrics["split"] == "out-of-fold test"
    predictions = pd.read_csv(tmp_path / "cv" / "metrics" / "predictions.csv")
    assert sorted(predictions["slide_id"]) == [f"slide_{i:03d}" for i in range(18)]
    # slides of one case never straddle a fold's train and test parts
    for fold in result.fold_dirs:
        tested = set(pd.read_csv(fold / "metrics" / "predictions.csv")["slide_id"])
        cases = {int(s[-3:]) // 2 for s in tested}
        assert {f"slide_{2 * c:03d}" for c in cases} | {f"slide_{2 * c + 1:03d}" for c in cases} == tested


def test_resume_continues_the_same_run(tmp_path):
    features, labels, _ = planted_dataset(tmp_path, n_slides=16, patches=(8, 12))
    run = tmp_path / "run"
    train_mil(_config(features, labels, run, epochs=2))
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    n_train = 9  # int(0.6 * 16)
    assert (first["epoch"], first["global_step"]) == (1, 2 * n_train)
    best_mtime = (run / "checkpoints" / "best.ckpt").stat().st_mtime_ns
    train_mil(_config(features, labels, run, epochs=2))  # finished: nothing is retrained
    assert (run / "checkpoints" / "best.ckpt").stat().st_mtime_ns == best_mtime
    result = train_mil(_config(features, labels, run, epochs=4))
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (3, 4 * n_train)
    # the optimizer kept its state across the restart: AdamW step counts equal the total steps
    assert all(s["step"] == 4 * n_train for s in last["optimizer_states"][0]["state"].values())
    assert result.metrics["max_epochs"] == 4
    with pytest.raises(CheckpointError, match="another model config"):
        train_mil(_config(features, labels, run, epochs=5, model_args={**TINY, "hidden_dim": 48}))


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    features, labels, _ = planted_dataset(tmp_path, n_slides=12, patches=(4, 8))
    frame = pd.read_csv(labels)
    missing = tmp_path / "missing.csv"
    pd.concat([frame, pd.DataFrame([{"slide_id": "ghost_1", "label": "tumor", "split": "train"},
                                    {"slide_id": "ghost_2", "label": "normal", "split": "val"}])]).to_csv(missing,
                                                                                                          index=False)
    with pytest.raises(DataError, match=r"2 slide\(s\) .* no features file: ghost_1, ghost_2"):
        train_mil(_config(features, missing, tmp_path / "r1"))
    code = main(["train", "mil", "--features", str(features), "--labels", str(missing), "--model", "abmil",
                 "--out", str(tmp_path / "r1")])
    assert code == 1 and "ghost_1" in capsys.readouterr().err
    skipped = train_mil(_config(features, missing, tmp_path / "r2", epochs=1, skip_missing=True))
    assert skipped.skipped_slides == ["ghost_1", "ghost_2"]

    one_class = tmp_path / "one.csv"
    frame.assign(label="tumor").to_csv(one_class, index=False)
    with pytest.raises(DataError, match="only one class"):
        train_mil(_config(features, one_class, tmp_path / "r3"))

    write_features(features / "slide_000.h5", np.zeros((5, 16), np.float32), np.zeros((5, 2), np.int64), {}, {})
    with pytest.raises(DataError, match="mixed dimensions"):
        train_mil(_config(features, labels, tmp_path / "r4"))
    write_features(features / "slide_000.h5", np.zeros((0, 32), np.float32), np.zeros((0, 2), np.int64), {}, {})
    with pytest.raises(DataError, match="empty bag: slide slide_000"):
        train_mil(_config(features, labels, tmp_path / "r5"))

    with pytest.raises(ConfigError, match="no split column"):
        train_mil(_config(features, _without_split(frame, tmp_path), tmp_path / "r6"))


def test_matmul_precision_is_set_for_the_run(tmp_path):
    """TF32 products by default ("high"), full float32 when asked; an unknown value is refused."""
    before = torch.backends.cuda.matmul.allow_tf32
    features, labels, _ = planted_dataset(tmp_path, n_slides=8, patches=(4, 8))
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        train_mil(_config(features, labels, tmp_path / "tf32", epochs=1))
        assert torch.backends.cuda.matmul.allow_tf32
        train_mil(_config(features, labels, tmp_path / "fp32", epochs=1, matmul_precision="highest"))
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    with pytest.raises(ConfigError, match="unknown matmul precision 'medium'"):
        train_mil(_config(features, labels, tmp_path / "bad", matmul_precision="medium"))


def _without_split(frame: pd.DataFrame, tmp_path):
    path = tmp_path / "nosplit.csv"
    frame.drop(columns="split").to_csv(path, index=False)
    return path


def test_checkpoint_for_another_config_is_refused(tmp_path, capsys):
    features, labels, _ = planted_dataset(tmp_path, n_slides=12, patches=(4, 8))
    run = tmp_path / "run"
    train_mil(_config(features, labels, run, epochs=1))
    data = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    data["hyper_parameters"]["model_kwargs"] = {**TINY, "hidden_dim": 64}
    edited = tmp_path / "edited.ckpt"
    torch.save(data, edited)
    with pytest.raises(CheckpointError, match="do not match the abmil-gated config"):
        load_mil_checkpoint(edited)
    data["hyper_parameters"]["family"] = "seg"
    torch.save(data, edited)
    with pytest.raises(CheckpointError, match="not a slide MIL model"):
        load_mil_checkpoint(edited)
    assert main(["evaluate", "--checkpoint", str(edited), "--out", str(tmp_path / "e0")]) == 2
    assert "segment predict" in capsys.readouterr().err
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    for i in range(12):
        write_features(narrow / f"slide_{i:03d}.h5", np.ones((3, 16), np.float32), np.zeros((3, 2), np.int64), {}, {})
    with pytest.raises(CheckpointError, match="expects 32-d features"):
        evaluate_mil([run / "checkpoints" / "best.ckpt"], narrow, labels, tmp_path / "e")


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one(tmp_path):
    """Two gloo ranks with one bag each per step take the same steps as one process accumulating two."""
    features, labels, _ = planted_dataset(tmp_path, n_slides=20, patches=(6, 10))  # 12 train bags: even
    common = {"sampler": "sequential", "epochs": 2, "monitor": "val_loss"}
    one = train_mil(_config(features, labels, tmp_path / "one", accumulate=2, **common))
    two = train_mil(_config(features, labels, tmp_path / "two", devices="2", strategy="ddp_spawn", **common))
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auc"):
        assert two.metrics[key] == pytest.approx(one.metrics[key], abs=1e-9), key
    p1 = pd.read_csv(tmp_path / "one" / "metrics" / "predictions.csv")["prob_tumor"]
    p2 = pd.read_csv(tmp_path / "two" / "metrics" / "predictions.csv")["prob_tumor"]
    np.testing.assert_allclose(p2, p1, atol=1e-5)
    w1 = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    w2 = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for name, value in w1.items():
        torch.testing.assert_close(w2[name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_mamba2d_trains_on_grids_the_loader_workers_build(tmp_path, monkeypatch):
    """With `grid_multiple`, each bag's grid is built by the dataset (in a worker process here)
    and the model uses it instead of building its own in the step."""
    import mambascope.models.mil.mamba2d as mamba2d_module
    from mambascope.data.bags import BagDataset, attach_features, read_label_table, single_bag
    from mambascope.models.mil.grid import patch_grid
    from mambascope.train.mil_module import MILModule

    features, labels, _ = planted_dataset(tmp_path, n_slides=4, patches=(10, 20))
    bags, _ = attach_features(read_label_table(labels), features)
    dataset = BagDataset(bags, grid_multiple=16)
    item = dataset[1]
    expected = patch_grid(item["coords"], len(item["features"]), multiple=16)
    assert item["grid"].width % 16 == 0 and (item["grid"].height, item["grid"].width) == (expected.height, expected.width)
    assert torch.equal(item["grid"].cell, expected.cell) and torch.equal(item["grid"].share, expected.share)

    def no_grid_in_the_step(*args, **kwargs):
        raise AssertionError("the model built a grid although the loader gave it one")

    monkeypatch.setattr(mamba2d_module, "patch_grid", no_grid_in_the_step)
    module = MILModule("mamba2d", 32, ["normal", "tumor"], {**SMALL["mamba2d"], "dropout": 0.0})
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=single_bag, num_workers=1)
    losses = [module.training_step(batch, 0).item() for batch in loader]
    assert len(losses) == len(bags) and all(np.isfinite(losses)) and min(losses) > 0
    with pytest.raises(AssertionError, match="built a grid"):  # without the loader's grid the step builds one
        module.training_step(BagDataset(bags)[0], 0)
