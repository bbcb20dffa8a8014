"""Classification metrics, their report files, and the run directory / trainer shared by all trainers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mambascope.errors import ConfigError, DataError
from mambascope.eval.classification import classification_metrics, save_classification_report
from mambascope.train.runs import RunLayout, build_trainer

NAMES = ["a", "b", "c"]


def test_metrics_against_hand_computed_values():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.6, 0.3],
                      [0.5, 0.1, 0.4], [0.1, 0.1, 0.8]])
    m = classification_metrics(y, probs, NAMES)
    # predictions: 0, 1, 1, 1, 0, 2
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.5}
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    f1 = [2 * 0.5 * 0.5 / 1.0, 2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * 1 * 0.5 / 1.5]  # precision/recall per class
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    # class c one-vs-rest: positives score 0.4, 0.8; negatives 0.1, 0.1, 0.1, 0.3 -> perfectly ranked
    assert m["per_class_auc"]["c"] == pytest.approx(1.0)
    # class a: positives 0.8, 0.2 vs negatives 0.1, 0.1, 0.5, 0.1 -> 7 of 8 pairs ordered
    assert m["per_class_auc"]["a"] == pytest.approx(7 / 8)
    assert m["auc"] == pytest.approx(np.mean(list(m["per_class_auc"].values())))
    assert m["n"] == 6


def test_auc_is_none_not_nan_when_a_class_is_absent():
    y = np.array([0, 0, 0])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]])
    m = classification_metrics(y, probs, ["neg", "pos"])
    assert m["auc"] is None
    assert m["per_class_accuracy"] == {"neg": pytest.approx(2 / 3), "pos": None}
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)


def test_metrics_refuse_mismatched_inputs():
    with pytest.raises(DataError, match="2 classes but 3 class names"):
        classification_metrics(np.array([0, 1]), np.eye(2), NAMES)
    with pytest.raises(DataError, match="do not match"):
        classification_metrics(np.array([0, 1, 1]), np.eye(2), ["x", "y"])


def test_report_writes_json_and_pictures(tmp_path):
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2] * 5)
    probs = rng.dirichlet([1, 1, 1], size=15)
    metrics = classification_metrics(y, probs, NAMES)
    paths = save_classification_report(metrics, y, probs, NAMES, tmp_path / "plots", tmp_path / "m" / "final.json")
    saved = json.loads(paths["metrics"].read_text())
    assert saved["accuracy"] == pytest.approx(metrics["accuracy"])
    assert saved["confusion_matrix"] == metrics["confusion_matrix"]
    for key in ("confusion_matrix", "roc"):
        with Image.open(paths[key]) as image:
            assert image.format == "PNG" and image.size[0] > 200


def test_run_layout_and_trainer(tmp_path):
    layout = RunLayout.create(tmp_path / "run")
    assert all(p.is_dir() for p in (layout.checkpoints, layout.logs, layout.plots, layout.metrics))
    assert layout.resume_checkpoint() is None
    trainer = build_trainer(layout, max_epochs=2, monitor="val_loss", mode="min", patience=3, accelerator="cpu",
                            devices=1, progress_bar=False)
    checkpoint = trainer.checkpoint_callback
    assert checkpoint.dirpath == str(layout.checkpoints) and checkpoint.monitor == "val_loss"
    assert any(type(c).__name__ == "EarlyStopping" for c in trainer.callbacks)
    assert Path(trainer.logger.log_dir) == layout.logs
    no_stop = build_trainer(layout, max_epochs=1, monitor="val_auc", mode="max", patience=0, accelerator="cpu",
                            devices=1, progress_bar=False)
    assert not any(type(c).__name__ == "EarlyStopping" for c in no_stop.callbacks)
    with pytest.raises(ConfigError):
        build_trainer(layout, max_epochs=1, monitor="val_loss", mode="lowest", patience=0)
