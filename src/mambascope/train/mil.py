"""Train, resume, cross-validate and evaluate slide-level MIL models (the Python side of `train mil`).

`train_mil(MILTrainConfig(...))` writes a run directory (design.md): `config.yaml`, `checkpoints/`,
`logs/`, `plots/`, `metrics/final_metrics.json`; with k folds each fold is such a directory
`fold_<i>/` and the root gets the per-fold table, mean ± std and the fold-ensemble's metrics.
`load_mil_checkpoint` rebuilds a trained model from a checkpoint alone; `evaluate_mil` scores one or
several checkpoints (probabilities averaged) on the slides of a labels CSV.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mambascope.config import write_resolved_config
from mambascope.data.bags import (
    BagDataset,
    LabelTable,
    SlideBag,
    attach_features,
    common_feature_dim,
    read_label_table,
)
from mambascope.data.splits import Split, make_splits
from mambascope.errors import CheckpointError, ConfigError, DataError, MambascopeError
from mambascope.eval.classification import classification_metrics, save_classification_report
from mambascope.train.checkpoints import checkpoint_hparams, load_checkpoint_dict
from mambascope.train.mil_options import LOSSES, MIL_MODELS, MONITORS, PRECISIONS, SAMPLERS, SCHEDULERS
from mambascope.train.runs import MATMUL_PRECISIONS, RunLayout

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc")


@dataclass
class MILTrainConfig:
    """Everything a MIL run needs; field names are the `mambascope train mil` option names."""

    features: Path
    labels: Path
    model: str
    out: Path
    model_args: dict[str, Any] = field(default_factory=dict)
    epochs: int = 20
    folds: int | None = None
    seed: int = 0
    lr: float = 2e-4
    weight_decay: float = 1e-4
    scheduler: str = "cosine"
    warmup_epochs: int = 0
    step_size: int = 10
    step_gamma: float = 0.5
    loss: str = "ce"
    focal_gamma: float = 2.0
    class_weights: bool = True
    sampler: str = "random"
    max_patches: int | None = None
    precision: str = "32-true"
    matmul_precision: str = "high"
    accumulate: int = 1
    monitor: str = "val_loss"
    patience: int = 10
    devices: str = "auto"
    accelerator: str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    num_workers: int = 0
    skip_missing: bool = False
    resume: bool = True
    wandb_project: str | None = None
    progress_bar: bool = True


@dataclass
class MILCheckpointInfo:
    """What a MIL checkpoint says about its model."""

    model_name: str
    model_kwargs: dict[str, Any]
    class_names: list[str]
    in_dim: int
    path: Path
    epoch: int | None = None


@dataclass
class MILRunResult:
    """Where a run wrote its outputs and its final metrics (root metrics for k-fold)."""

    root: Path
    metrics: dict[str, Any]
    fold_dirs: list[Path]
    skipped_slides: list[str]


# --------------------------------------------------------------------------------------- checkpoints


def _checkpoint_info(hparams: dict[str, Any], path: Path, epoch: int | None) -> MILCheckpointInfo:
    try:
        return MILCheckpointInfo(model_name=str(hparams["model_name"]), model_kwargs=dict(hparams.get("model_kwargs") or {}),
                                 class_names=[str(c) for c in hparams["class_names"]], in_dim=int(hparams["in_dim"]),
                                 path=path, epoch=epoch)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"MIL checkpoint hyper-parameters lack {exc}", path=path,
                              hint="pass a checkpoint written by `mambascope train mil`") from None


def load_mil_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[nn.Module, MILCheckpointInfo]:
    """Rebuild the model a MIL checkpoint describes, load its weights, and return it in eval mode."""
    from mambascope.models import create_model

    path = Path(path)
    data = load_checkpoint_dict(path, map_location)
    hparams = checkpoint_hparams(data, path)
    if hparams["family"] != "mil":
        raise CheckpointError(f"checkpoint is a {hparams['family']!r} model, not a slide MIL model", path=path,
                              hint="pass a checkpoint from `mambascope train mil`")
    info = _checkpoint_info(hparams, path, data.get("epoch"))
    try:
        model = create_model(info.model_name, in_dim=info.in_dim, num_classes=len(info.class_names),
                             **info.model_kwargs)
    except (MambascopeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint's model config cannot be built ({exc})", path=path,
                              hint="the checkpoint was written by another mambascope version or edited") from None
    state = {k.removeprefix("model."): v for k, v in data["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(f"checkpoint weights do not match the {info.model_name} config ({detail[:200]})",
                              path=path, hint="the weights belong to another model configuration") from None
    return model.eval(), info


def _check_resume_compatible(path: Path, expected: dict[str, Any]) -> None:
    """A run directory's last.ckpt must be for the same model config as the run being resumed."""
    hparams = checkpoint_hparams(load_checkpoint_dict(path), path)
    diffs = [key for key in ("family", "model_name", "model_kwargs", "class_names", "in_dim")
             if hparams.get(key) != expected.get(key)]
    if diffs:
        raise CheckpointError(f"the run directory holds a checkpoint for another model config (differs in "
                              f"{', '.join(diffs)})", path=path,
                              hint="choose a new --out, or pass --no-resume to start this run afresh")


# --------------------------------------------------------------------------------------- prediction


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def predict_bags(models: Sequence[nn.Module], dataset: BagDataset, device: torch.device | None = None
                 ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities (n, C) averaged over `models`, and each bag's mean per-patch scores."""
    device = device or _device()
    models = [m.to(device).eval() for m in models]
    probs, scores = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        features = item["features"].to(device)
        outs = [m(features, item["coords"]) for m in models]  # coords stay on the host (see MILModule)
        probs.append(torch.stack([torch.softmax(o.logits.float(), -1) for o in outs]).mean(0).cpu().numpy())
        scores.append(torch.stack([o.scores.float() for o in outs]).mean(0).cpu().numpy())
    return np.stack(probs), scores


def _write_predictions(path: Path, bags: Sequence[SlideBag], probs: np.ndarray, class_names: Sequence[str]) -> None:
    import pandas as pd

    from mambascope.atomic import atomic_path

    frame = pd.DataFrame({"slide_id": [b.slide_id for b in bags],
                          "label": [class_names[b.label] for b in bags],
                          "predicted": [class_names[k] for k in probs.argmax(1)]})
    for k, name in enumerate(class_names):
        frame[f"prob_{name}"] = probs[:, k]
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _report(layout: RunLayout, bags: Sequence[SlideBag], probs: np.ndarray, class_names: Sequence[str],
            extra: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Metrics of `probs` against the bags' labels, written as JSON, plots and a predictions CSV."""
    labels = np.asarray([b.label for b in bags])
    metrics = {**classification_metrics(labels, probs, class_names), **extra}
    name = f"{prefix}final_metrics.json" if prefix else "final_metrics.json"
    save_classification_report(metrics, labels, probs, class_names, layout.plots, layout.metrics / name, prefix=prefix)
    _write_predictions(layout.metrics / f"{prefix}predictions.csv", bags, probs, class_names)
    return metrics


# --------------------------------------------------------------------------------------- training


def _resolve_inputs(cfg: MILTrainConfig) -> tuple[LabelTable, list[SlideBag], list[str], int]:
    table = read_label_table(cfg.labels)
    if len(table.class_names) < 2:
        raise DataError(f"the label column has only one class ({table.class_names[0]!r})", path=cfg.labels,
                        hint="a classifier needs slides of at least two classes")
    bags, skipped = attach_features(table, cfg.features, skip_missing=cfg.skip_missing)
    return table, bags, skipped, common_feature_dim(bags)


def _validate(cfg: MILTrainConfig) -> None:
    checks = [(cfg.model in MIL_MODELS, f"unknown MIL model {cfg.model!r}", f"choose one of: {', '.join(MIL_MODELS)}"),
              (cfg.scheduler in SCHEDULERS, f"unknown scheduler {cfg.scheduler!r}", f"choose one of: {', '.join(SCHEDULERS)}"),
              (cfg.loss in LOSSES, f"unknown loss {cfg.loss!r}", f"choose one of: {', '.join(LOSSES)}"),
              (cfg.precision in PRECISIONS, f"unknown precision {cfg.precision!r}", f"choose one of: {', '.join(PRECISIONS)}"),
              (cfg.matmul_precision in MATMUL_PRECISIONS, f"unknown matmul precision {cfg.matmul_precision!r}",
               f"choose one of: {', '.join(MATMUL_PRECISIONS)}"),
              (cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}", None),
              (cfg.sampler in SAMPLERS, f"unknown sampler {cfg.sampler!r}", f"choose one of: {', '.join(SAMPLERS)}"),
              (cfg.monitor in MONITORS, f"cannot monitor {cfg.monitor!r}", f"choose one of: {', '.join(MONITORS)}"),
              (cfg.max_patches is None or cfg.max_patches >= 1, "--max-patches must be positive", None),
              (cfg.accumulate >= 1, "--accumulate must be at least 1", None)]
    for ok, message, hint in checks:
        if not ok:
            raise ConfigError(message, hint=hint)


def _is_complete(layout: RunLayout, cfg: MILTrainConfig) -> bool:
    """This split already finished with the same number of epochs (a rerun skips it)."""
    try:
        done = json.loads(layout.final_metrics.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return "accuracy" in done and done.get("max_epochs") == cfg.epochs and layout.best_checkpoint.is_file()


def _devices(value: str) -> int | str | list[int]:
    """`auto`, a count (`2`), or a list of ids (`0,1`)."""
    if "," in value:
        return [int(v) for v in value.split(",") if v.strip()]
    return int(value) if value.isdigit() else value


def _train_split(cfg: MILTrainConfig, layout: RunLayout, bags: list[SlideBag], split: Split,
                 class_names: list[str], in_dim: int) -> Path | None:
    """Fit one split; returns the best checkpoint on the global-zero rank, None on the others."""
    import lightning

    from mambascope.train.losses import balanced_class_weights
    from mambascope.train.mil_module import BagDataModule, MILModule
    from mambascope.train.runs import build_trainer

    train_labels = [bags[i].label for i in split.train]
    if len(set(train_labels)) < 2:
        raise DataError(f"{split.name}: the training slides hold only one class",
                        hint="every class needs training slides; check the split column or use fewer folds")
    if cfg.monitor == "val_auc" and len({bags[i].label for i in split.val}) < 2:
        raise ConfigError(f"{split.name}: --monitor val_auc needs validation slides of at least two classes",
                          hint="monitor val_loss instead, or put slides of every class in the val split")
    lightning.seed_everything(cfg.seed, workers=True, verbose=False)
    class_weights = balanced_class_weights(train_labels, len(class_names))
    module = MILModule(cfg.model, in_dim, class_names, cfg.model_args, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       scheduler=cfg.scheduler, warmup_epochs=cfg.warmup_epochs, step_size=cfg.step_size,
                       step_gamma=cfg.step_gamma, loss=cfg.loss, focal_gamma=cfg.focal_gamma,
                       class_weights=class_weights if cfg.class_weights else None, max_epochs=cfg.epochs)
    resume_from = layout.resume_checkpoint() if cfg.resume else None
    if resume_from is not None:
        _check_resume_compatible(resume_from, dict(module.hparams))
        log.info("resuming %s from %s", split.name, resume_from)
    trainer = build_trainer(layout, max_epochs=cfg.epochs, monitor=cfg.monitor, mode=MONITORS[cfg.monitor],
                            patience=cfg.patience, precision=cfg.precision,
                            matmul_precision=cfg.matmul_precision, devices=_devices(str(cfg.devices)),
                            accelerator=cfg.accelerator, accumulate_grad_batches=cfg.accumulate,
                            strategy=cfg.strategy, wandb_project=cfg.wandb_project, num_nodes=cfg.num_nodes,
                            progress_bar=cfg.progress_bar, log_every_n_steps=max(1, min(10, len(split.train))),
                            use_distributed_sampler=False)
    # grid models get each bag's grid from the loader (its workers build it while the step runs)
    device = trainer.strategy.root_device
    multiple_for = getattr(module.model, "grid_multiple", None)
    grid_multiple = multiple_for(device) if multiple_for else None
    data = BagDataModule(BagDataset([bags[i] for i in split.train], max_patches=cfg.max_patches,
                                    grid_multiple=grid_multiple),
                         BagDataset([bags[i] for i in split.val], grid_multiple=grid_multiple),
                         cfg.sampler, class_weights, cfg.seed, cfg.num_workers, pin_memory=device.type == "cuda")
    trainer.fit(module, datamodule=data, ckpt_path=str(resume_from) if resume_from else None)
    if not trainer.is_global_zero:
        return None
    return layout.best_checkpoint if layout.best_checkpoint.is_file() else layout.last_checkpoint


def _evaluate_split(cfg: MILTrainConfig, layout: RunLayout, bags: list[SlideBag], split: Split,
                    checkpoint: Path, class_names: list[str]) -> tuple[dict[str, Any], list[int], np.ndarray]:
    """Score the best checkpoint on the split's test slides (validation when there are none)."""
    evaluated_on, indices = ("test", split.test) if split.test else ("val", split.val)
    model, info = load_mil_checkpoint(checkpoint)
    probs, _ = predict_bags([model], BagDataset([bags[i] for i in indices]))
    extra = {"split": evaluated_on, "model": cfg.model, "checkpoint": str(checkpoint), "epoch": info.epoch,
             "max_epochs": cfg.epochs, "n_train": len(split.train), "n_val": len(split.val),
             "n_test": len(split.test)}
    metrics = _report(layout, [bags[i] for i in indices], probs, class_names, extra)
    return metrics, indices, probs


def _fold_summary(root: RunLayout, fold_metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-fold rows and mean ± std of the headline metrics, as CSV and markdown tables."""
    import pandas as pd

    from mambascope.atomic import write_text_atomic

    frame = pd.DataFrame([{k: (np.nan if m.get(k) is None else m[k]) for k in SUMMARY_METRICS} for m in fold_metrics],
                         index=[f"fold_{i}" for i in range(len(fold_metrics))])
    mean, std = frame.mean(), frame.std(ddof=1)
    table = pd.concat([frame, mean.to_frame("mean").T, std.to_frame("std").T])
    write_text_atomic(root.metrics / "folds.csv", table.to_csv(index_label="fold"))
    lines = ["| fold | " + " | ".join(SUMMARY_METRICS) + " |", "|---" * (len(SUMMARY_METRICS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{row[k]:.4f}" for k in SUMMARY_METRICS) + " |" for name, row in frame.iterrows()]
    lines.append("| mean ± std | " + " | ".join(f"{mean[k]:.4f} ± {std[k]:.4f}" for k in SUMMARY_METRICS) + " |")
    write_text_atomic(root.metrics / "folds.md", "\n".join(lines) + "\n")
    return {"mean": mean.to_dict(), "std": std.to_dict()}


def train_mil(cfg: MILTrainConfig) -> MILRunResult | None:
    """Run training (one split or k folds), then evaluation. Returns None on non-zero DDP ranks."""
    from lightning.pytorch.utilities import rank_zero_only

    _validate(cfg)
    table, bags, skipped, in_dim = _resolve_inputs(cfg)
    splits = make_splits(bags, cfg.folds, cfg.seed)
    root = RunLayout.create(cfg.out)
    if rank_zero_only.rank == 0:
        write_resolved_config(root.root, asdict(cfg))
    class_names = table.class_names
    fold_results: list[tuple[RunLayout, dict[str, Any], list[int], np.ndarray]] = []
    for split in splits:
        layout = root if split.name == "split" else RunLayout.create(root.root / split.name)
        if cfg.resume and _is_complete(layout, cfg):
            log.info("%s already complete in %s; skipping", split.name, layout.root)
            checkpoint: Path | None = layout.best_checkpoint
        else:
            checkpoint = _train_split(cfg, layout, bags, split, class_names, in_dim)
        if checkpoint is None:
            continue
        metrics, indices, probs = _evaluate_split(cfg, layout, bags, split, checkpoint, class_names)
        fold_results.append((layout, metrics, indices, probs))
    if rank_zero_only.rank != 0 or not fold_results:
        return None
    if len(splits) == 1:
        return MILRunResult(root.root, fold_results[0][1], [], skipped)
    return _finish_kfold(cfg, root, bags, splits, fold_results, class_names, skipped)


def _finish_kfold(cfg: MILTrainConfig, root: RunLayout, bags: list[SlideBag], splits: list[Split],
                  fold_results: list, class_names: list[str], skipped: list[str]) -> MILRunResult:
    """Fold table + mean ± std; the fold ensemble on the common test set, else out-of-fold metrics."""
    summary = _fold_summary(root, [r[1] for r in fold_results])
    extra = {"model": cfg.model, "folds": {layout.root.name: {k: m.get(k) for k in SUMMARY_METRICS}
                                           for layout, m, _, _ in fold_results},
             "max_epochs": cfg.epochs, **summary}
    common_test = splits[0].test if any(b.split == "test" for b in bags) else []
    if common_test:  # every fold tested on the same slides: average the fold models' probabilities
        models = [load_mil_checkpoint(layout.best_checkpoint)[0] for layout, *_ in fold_results]
        probs, _ = predict_bags(models, BagDataset([bags[i] for i in common_test]))
        extra |= {"split": "test", "evaluated": f"ensemble of {len(models)} fold models (mean probability)"}
        metrics = _report(root, [bags[i] for i in common_test], probs, class_names, extra)
    else:
        order = np.concatenate([np.asarray(r[2]) for r in fold_results])
        probs = np.concatenate([r[3] for r in fold_results])
        extra |= {"split": "out-of-fold test", "evaluated": "each slide by the fold model that held it out"}
        metrics = _report(root, [bags[i] for i in order], probs, class_names, extra)
    return MILRunResult(root.root, metrics, [r[0].root for r in fold_results], skipped)


# --------------------------------------------------------------------------------------- evaluation


def evaluate_mil(checkpoints: Sequence[str | Path], features: str | Path, labels: str | Path, out: str | Path,
                 split: str | None = None, skip_missing: bool = False) -> dict[str, Any]:
    """Metrics of one checkpoint or an ensemble (mean probability) on a labels CSV's slides.

    `split` picks rows of the CSV's split column; by default `test` when present, else `val`, else all.
    Writes `out/metrics/final_metrics.json`, `out/metrics/predictions.csv` and `out/plots/`.
    """
    if not checkpoints:
        raise ConfigError("no checkpoint given", hint="pass --checkpoint RUN/checkpoints/best.ckpt")
    loaded = [load_mil_checkpoint(c) for c in checkpoints]
    first = loaded[0][1]
    for _, info in loaded[1:]:
        if info.class_names != first.class_names or info.in_dim != first.in_dim:
            raise CheckpointError("checkpoints disagree on classes or feature width, so they cannot be ensembled",
                                  path=info.path, hint="ensemble only checkpoints of one task and encoder")
    table = read_label_table(labels, class_names=first.class_names)
    bags, skipped = attach_features(table, features, skip_missing=skip_missing)
    dim = common_feature_dim(bags)
    if dim != first.in_dim:
        raise CheckpointError(f"the checkpoint expects {first.in_dim}-d features but {features} holds {dim}-d ones",
                              path=first.path, hint="evaluate on features from the encoder the model was trained with")
    present = {b.split for b in bags}
    split = split or next((s for s in ("test", "val") if s in present), None)
    chosen = [b for b in bags if split is None or b.split == split]
    if not chosen:
        raise DataError(f"no slide of split {split!r} has features", path=labels,
                        hint="pick a split present in the CSV's split column with --split")
    probs, _ = predict_bags([m for m, _ in loaded], BagDataset(chosen))
    layout = RunLayout.create(out)
    extra = {"split": split or "all", "checkpoints": [str(c) for c in checkpoints], "model": first.model_name,
             "skipped_slides": skipped}
    return _report(layout, chosen, probs, first.class_names, extra)
