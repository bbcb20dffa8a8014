"""Classification metrics and their report (JSON + confusion matrix and ROC pictures).

Shared by the slide (MIL) and patch classifiers so both write the same `final_metrics.json` keys.
An AUC is only defined for a class that has both positives and negatives; the macro AUC averages the
classes where it is defined and is None when none is (a JSON null, never NaN).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mambascope.atomic import atomic_path, write_text_atomic
from mambascope.errors import DataError


def _check(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise DataError(f"probabilities of shape {p.shape} do not match {y.shape[0]} labels",
                        hint="pass probs as (n_samples, n_classes)")
    if p.shape[1] != len(class_names):
        raise DataError(f"probabilities have {p.shape[1]} classes but {len(class_names)} class names were given",
                        hint="give one class name per column of probs")
    if y.size == 0:
        raise DataError("no samples to evaluate", hint="check that the evaluated split is not empty")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise DataError(f"labels must lie in 0..{p.shape[1] - 1}, got {y.min()}..{y.max()}")
    return y, p


def _per_class_auc(y: np.ndarray, p: np.ndarray, class_names: Sequence[str]) -> dict[str, float | None]:
    from sklearn.metrics import roc_auc_score

    out: dict[str, float | None] = {}
    for k, name in enumerate(class_names):
        positives = y == k
        if positives.all() or not positives.any():
            out[name] = None
        else:
            out[name] = float(roc_auc_score(positives, p[:, k]))
    return out


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, per-class accuracy, one-vs-rest AUC, confusion matrix, n."""
    from sklearn.metrics import confusion_matrix, f1_score

    y, p = _check(y_true, probs, class_names)
    labels = list(range(len(class_names)))
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=labels)
    support = cm.sum(axis=1)
    recall = {name: (float(cm[k, k] / support[k]) if support[k] else None) for k, name in enumerate(class_names)}
    present = [r for r in recall.values() if r is not None]
    per_class_auc = _per_class_auc(y, p, class_names)
    defined = [a for a in per_class_auc.values() if a is not None]
    return {
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(np.mean(present)),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "per_class_accuracy": recall,
        "auc": float(np.mean(defined)) if defined else None,
        "per_class_auc": per_class_auc,
        "confusion_matrix": cm.astype(int).tolist(),
        "class_names": list(class_names),
        "n": int(y.size),
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics_json(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write a metrics mapping as indented JSON (NaN/inf become null), atomically."""
    return write_text_atomic(path, json.dumps(_json_safe(metrics), indent=2, sort_keys=True) + "\n")


def _plot_confusion(cm: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.7 * len(class_names) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(cm, display_labels=list(class_names)).plot(ax=ax, colorbar=False, cmap="Blues",
                                                                      xticks_rotation=45)
    ax.set_title("Confusion matrix")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _plot_roc(y: np.ndarray, p: np.ndarray, class_names: Sequence[str], per_class_auc: Mapping[str, Any],
              path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 5))
    classes = range(len(class_names))
    if len(class_names) == 2:  # both one-vs-rest curves of a binary task are the same curve
        classes = range(1, 2)
    for k in classes:
        name = class_names[k]
        if per_class_auc.get(name) is None:
            continue
        fpr, tpr, _ = roc_curve(y == k, p[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUC {per_class_auc[name]:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC (one vs rest)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "AUC undefined: a class has no\npositive or no negative sample", ha="center")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def save_classification_report(
    metrics: Mapping[str, Any],
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    plots_dir: str | Path,
    metrics_path: str | Path,
    *,
    prefix: str = "",
) -> dict[str, Path]:
    """Write `metrics` as JSON at `metrics_path`, and `<prefix>confusion_matrix.png`, `<prefix>roc.png`."""
    y, p = _check(y_true, probs, class_names)
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    cm = np.asarray(metrics.get("confusion_matrix") or classification_metrics(y, p, class_names)["confusion_matrix"])
    per_class_auc = metrics.get("per_class_auc") or _per_class_auc(y, p, class_names)
    paths = {
        "metrics": write_metrics_json(metrics_path, metrics),
        "confusion_matrix": plots_dir / f"{prefix}confusion_matrix.png",
        "roc": plots_dir / f"{prefix}roc.png",
    }
    _plot_confusion(cm, class_names, paths["confusion_matrix"])
    _plot_roc(y, p, class_names, per_class_auc, paths["roc"])
    return paths
