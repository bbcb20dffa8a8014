"""Train, evaluate and predict with the patch classifiers (HistoMamba, Microscopic-Mamba).

`train_histomamba` reads HDF5 patch files labelled per sample (split by sample), `train_microscopic_mamba`
an ImageFolder tree with train/val/test splits; both fit the same Lightning module into a run directory
(`config.yaml`, `checkpoints/{best,last}.ckpt`, `logs/`, `plots/`, `metrics/`, `best_model_patch.pth`).
`evaluate_checkpoint` scores a checkpoint on a split; `predict_images` writes per-image probabilities
for a folder of images or an HDF5 patch file, averaging over several checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from mambascope.atomic import atomic_path, write_text_atomic
from mambascope.config import write_resolved_config
from mambascope.data.image_folder import (
    STATS_FILE,
    ImageListDataset,
    dataset_stats,
    files_fingerprint,
    list_images,
    load_image_folder,
    load_split,
    read_rgb,
    read_stats,
    stats_images,
)
from mambascope.data.patch_h5 import (
    PatchH5Dataset,
    check_split_classes,
    inspect_patch_file,
    load_labelled_patches,
    split_samples,
)
from mambascope.data.patch_transforms import IMAGENET_MEAN, IMAGENET_STD, TransformSpec, build_transform
from mambascope.errors import CheckpointError, ConfigError, DataError
from mambascope.train.patch_module import (
    MONITOR_MODES,
    PatchCheckpointInfo,
    PatchClassifierModule,
    export_best_model,
    load_patch_checkpoint,
)
from mambascope.train.runs import RunLayout, build_trainer

BEST_MODEL_FILE = "best_model_patch.pth"
PREDICTIONS_FILE = "predictions.csv"


@dataclass
class PatchTrainConfig:
    """Settings shared by both trainers (the CLI's options; defaults follow the HistoMamba script)."""

    model: str
    output_dir: Path
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: int = 256
    batch_size: int = 64
    num_epochs: int = 50
    lr: float = 1e-4
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    warmup_epochs: int = 0
    min_lr_ratio: float = 0.01
    lambda_recon: float = 0.0
    label_smoothing: float = 0.0
    monitor_metric: str = "val_loss"
    early_stopping_patience: int = 10
    early_stopping_min_delta: float = 0.0
    use_weighted_sampler: bool = False
    augment: bool = True
    recipe: str = "histopathology"
    mean: list[float] | None = None
    std: list[float] | None = None
    amp: bool = True
    num_workers: int = 0
    seed: int = 42
    devices: str | int = "auto"
    accelerator: str = "auto"
    strategy: str = "auto"
    wandb_project: str | None = None
    progress_bar: bool = True

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if self.monitor_metric not in MONITOR_MODES:
            raise ConfigError(f"unknown monitor metric {self.monitor_metric!r}",
                              hint=f"use one of {', '.join(MONITOR_MODES)}")
        if self.optimizer not in ("adam", "adamw"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}", hint="use adam or adamw")
        for name in ("batch_size", "num_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.lambda_recon < 0 or self.warmup_epochs < 0:
            raise ConfigError("lr must be > 0, lambda_recon and warmup_epochs >= 0")


@dataclass
class PatchRunResult:
    """Where a training run wrote its outputs, and its final metrics."""

    run_dir: Path
    best_checkpoint: Path
    best_model: Path
    metrics: dict[str, Any]
    skipped: bool = False


def _precision(amp: bool) -> str:
    """Mixed precision only where it pays (CUDA); bf16 where the GPU has it, else fp16 with scaling."""
    if not amp or not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _weighted_sampler(labels: np.ndarray, seed: int) -> WeightedRandomSampler:
    """Draw every class equally often: weight 1 / (count of the item's class)."""
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples=len(labels),
                                 replacement=True, generator=generator)


def _loader(dataset: Dataset, batch_size: int, num_workers: int, *, train: bool = False,
            sampler: WeightedRandomSampler | None = None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=num_workers, persistent_workers=num_workers > 0,
                      pin_memory=torch.cuda.is_available(),
                      drop_last=train and len(dataset) > batch_size)  # no BatchNorm batch of one


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, dataset: Dataset, batch_size: int = 64,
                          num_workers: int = 0, device: torch.device | None = None) -> np.ndarray:
    """Softmax probabilities (N, C) of a dataset of (image, label) items, in dataset order."""
    device = device or next(model.parameters()).device
    model.eval()
    chunks = []
    for images, _ in _loader(dataset, batch_size, num_workers):
        chunks.append(torch.softmax(model(images.to(device)).float(), dim=1).cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0))


def item_names(dataset: Dataset) -> list[str]:
    """A name per item: image paths as given, HDF5 patches as `<sample_id>:<index>`."""
    if isinstance(dataset, PatchH5Dataset):
        return [f"{info.sample_id}:{i}" for info in dataset.files for i in range(info.num_patches)]
    return [str(path) for path in dataset.paths]


def write_predictions(path: Path, names: Sequence[str], probs: np.ndarray, class_names: Sequence[str],
                      labels: np.ndarray | None = None, extra: dict[str, Sequence[Any]] | None = None) -> Path:
    """CSV of `image`, [`label`], `predicted_label`, `confidence`, `prob_<class>`... (atomic)."""
    import pandas as pd

    table = pd.DataFrame({"image": list(names), **(extra or {})})
    if labels is not None:
        table["label"] = [class_names[k] for k in labels]
    table["predicted_label"] = [class_names[k] for k in probs.argmax(1)]
    table["confidence"] = probs.max(1)
    for k, name in enumerate(class_names):
        table[f"prob_{name}"] = probs[:, k]
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6f")
    return path


def _report(model: torch.nn.Module, info: PatchCheckpointInfo, dataset: Dataset, labels: np.ndarray,
            split: str, layout: RunLayout, batch_size: int) -> dict[str, Any]:
    """Metrics of one split: `metrics/<split>_metrics.json`, `metrics/<split>_predictions.csv`, plots."""
    from mambascope.eval.classification import classification_metrics, save_classification_report

    probs = predict_probabilities(model, dataset, batch_size)
    metrics = {"split": split, **classification_metrics(labels, probs, info.class_names)}
    save_classification_report(metrics, labels, probs, info.class_names, layout.plots,
                               layout.metrics / f"{split}_metrics.json", prefix=f"{split}_")
    write_predictions(layout.metrics / f"{split}_predictions.csv", item_names(dataset), probs, info.class_names,
                      labels)
    return metrics


def _finished_run(layout: RunLayout) -> PatchRunResult | None:
    """A complete earlier run in this directory (its metrics and exported model load), else None."""
    best_model = layout.root / BEST_MODEL_FILE
    if not (layout.final_metrics.is_file() and best_model.is_file()):
        return None
    try:
        metrics = json.loads(layout.final_metrics.read_text())
        load_patch_checkpoint(best_model)
    except (json.JSONDecodeError, CheckpointError):
        return None
    return PatchRunResult(layout.root, layout.best_checkpoint, best_model, metrics, skipped=True)


def fit_patch_classifier(config: PatchTrainConfig, class_names: Sequence[str], datasets: dict[str, Dataset],
                         spec: TransformSpec, data_info: dict[str, Any]) -> PatchRunResult:
    """Fit on `datasets["train"]`, early-stop on `datasets["val"]`, report on val and (if given) test.

    Each dataset must offer `patch_labels()`; their transforms are set here from `spec`. A run
    directory that already holds a finished run is left as it is.
    """
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping

    layout = RunLayout.create(config.output_dir)
    done = _finished_run(layout)
    if done is not None:
        return done
    if len(class_names) < 2:
        raise DataError(f"need at least two classes to train a classifier, found {list(class_names)}",
                        hint="check the label column / class folders")
    split_labels = {name: ds.patch_labels() for name, ds in datasets.items()}
    check_split_classes({k: v.tolist() for k, v in split_labels.items()}, class_names)
    if len(datasets.get("val", [])) == 0:
        raise DataError("the validation split is empty", hint="raise --val-split or add validation images")
    write_resolved_config(layout.root, {**asdict(config), "transform": spec.to_dict(), "data": data_info})
    L.seed_everything(config.seed, workers=True)
    datasets["train"].transform = build_transform(spec, train=config.augment)
    for name in datasets.keys() - {"train"}:
        datasets[name].transform = build_transform(spec, train=False)

    hparams = {
        "model_name": config.model,
        "model_kwargs": dict(config.model_kwargs),
        "class_names": list(class_names),
        "transform": spec.to_dict(),
        "optimizer": {"name": config.optimizer, "lr": config.lr, "weight_decay": config.weight_decay,
                      "warmup_epochs": config.warmup_epochs, "min_lr_ratio": config.min_lr_ratio},
        "lambda_recon": config.lambda_recon,
        "label_smoothing": config.label_smoothing,
        "monitor": config.monitor_metric,
        "data": data_info,
    }
    module = PatchClassifierModule(hparams)
    sampler = _weighted_sampler(split_labels["train"], config.seed) if config.use_weighted_sampler else None
    train_loader = _loader(datasets["train"], config.batch_size, config.num_workers, train=True, sampler=sampler)
    val_loader = _loader(datasets["val"], config.batch_size, config.num_workers)
    mode = MONITOR_MODES[config.monitor_metric]
    stopping = [EarlyStopping(monitor=config.monitor_metric, mode=mode, patience=config.early_stopping_patience,
                              min_delta=config.early_stopping_min_delta)] if config.early_stopping_patience else []
    trainer = build_trainer(layout, max_epochs=config.num_epochs, monitor=config.monitor_metric, mode=mode,
                            patience=None, precision=_precision(config.amp), devices=config.devices,
                            accelerator=config.accelerator, strategy=config.strategy,
                            wandb_project=config.wandb_project, extra_callbacks=stopping,
                            progress_bar=config.progress_bar,
                            log_every_n_steps=max(1, min(10, len(train_loader))))
    trainer.fit(module, train_loader, val_loader, ckpt_path=layout.resume_checkpoint())
    if not trainer.is_global_zero:
        return PatchRunResult(layout.root, layout.best_checkpoint, layout.root / BEST_MODEL_FILE, {})

    best = layout.best_checkpoint if layout.best_checkpoint.is_file() else layout.last_checkpoint
    best_model = export_best_model(best, layout.root / BEST_MODEL_FILE)
    model, info = load_patch_checkpoint(best_model, _device())
    reports = {}
    for split in ("val", "test"):
        if split in datasets and len(datasets[split]):
            reports[split] = _report(model, info, datasets[split], split_labels[split], split, layout,
                                     config.batch_size)
    final_split = "test" if "test" in reports else "val"
    final = {**reports[final_split], "best_checkpoint": str(best), "monitor": config.monitor_metric,
             "epochs_trained": int(trainer.current_epoch)}
    from mambascope.eval.classification import write_metrics_json

    write_metrics_json(layout.final_metrics, final)
    return PatchRunResult(layout.root, best, best_model, final)


def train_histomamba(config: PatchTrainConfig, data_dir: str | Path, metadata_csv: str | Path,
                     label_col: str, id_col: str = "id", patch_dir_name: str = "patches",
                     val_split: float = 0.15, test_split: float = 0.0) -> PatchRunResult:
    """Train on HDF5 patch files; every patch has its sample's label; samples (not patches) are split."""
    layout = RunLayout.create(config.output_dir)
    patches = load_labelled_patches(data_dir, metadata_csv, label_col, id_col, patch_dir_name,
                                    cache_dir=layout.root / "manifest_cache")
    splits = split_samples(patches.sample_labels, val_split, test_split, config.seed)
    spec = TransformSpec(config.img_size, config.mean or list(IMAGENET_MEAN), config.std or list(IMAGENET_STD),
                         config.recipe)
    datasets = {}
    for name, ids in splits.items():
        if ids:
            subset = patches.subset(ids)
            datasets[name] = PatchH5Dataset(subset.files, subset.labels)
    data_info = {"kind": "patch_h5", "data_dir": str(Path(data_dir).resolve()),
                 "metadata_csv": str(Path(metadata_csv).resolve()), "label_col": label_col, "id_col": id_col,
                 "patch_dir_name": patch_dir_name, "splits": splits, "patch_size": list(patches.patch_size)}
    return fit_patch_classifier(config, patches.class_names, datasets, spec, data_info)


def resolve_stats(root: str | Path, run_dir: Path) -> tuple[list[float], list[float], Path]:
    """Mean/std of the training images: `root/stats.json` when it matches the images, else computed now."""
    stored = read_stats(Path(root) / STATS_FILE)
    if stored is not None and stored.fingerprint == files_fingerprint(stats_images(root, "train")):
        return stored.mean, stored.std, Path(root) / STATS_FILE
    stats, path, _ = dataset_stats(root, "train", out_path=run_dir / STATS_FILE)
    return stats.mean, stats.std, path


def train_microscopic_mamba(config: PatchTrainConfig, data_root: str | Path) -> PatchRunResult:
    """Train on `data_root/{train,val[,test]}/<class>/*` normalised with the dataset's own mean and std."""
    layout = RunLayout.create(config.output_dir)
    root = Path(data_root)
    names = ["train", "val"] + (["test"] if (root / "test").is_dir() else [])
    splits = load_image_folder(root, names)
    if config.mean is None or config.std is None:
        mean, std, stats_path = resolve_stats(root, layout.root)
    else:
        mean, std, stats_path = config.mean, config.std, None
    spec = TransformSpec(config.img_size, mean, std, config.recipe)
    datasets = {name: ImageListDataset(split.paths, split.labels) for name, split in splits.items()}
    data_info = {"kind": "image_folder", "data_root": str(root.resolve()),
                 "stats": None if stats_path is None else str(stats_path),
                 "num_images": {name: len(split.paths) for name, split in splits.items()}}
    return fit_patch_classifier(config, splits["train"].class_names, datasets, spec, data_info)


def _labelled_split(info: PatchCheckpointInfo, data_root: Path, split: str) -> Dataset:
    """The evaluation data: an ImageFolder split under `data_root`, else the HDF5 samples the run held out."""
    transform = build_transform(info.transform, train=False)
    if (data_root / split).is_dir():
        images = load_split(data_root, split, info.class_names)
        return ImageListDataset(images.paths, images.labels, transform)
    data = info.hyper_parameters.get("data") or {}
    if data.get("kind") != "patch_h5" or not data_root.is_dir():
        raise DataError(f"no {split!r} split found under the data root", path=data_root,
                        hint=f"give an ImageFolder root with {split}/<class>/ or the HDF5 --data-dir of the run")
    ids = list(data.get("splits", {}).get(split, []))
    if not ids:
        raise DataError(f"the checkpoint's run held out no samples as {split!r}", path=info.path,
                        hint="train with --test-split > 0, or evaluate --split val")
    patches = load_labelled_patches(data_root, data["metadata_csv"], data["label_col"], data["id_col"],
                                    data["patch_dir_name"], class_names=info.class_names)
    present = [s for s in ids if s in {f.sample_id for f in patches.files}]
    if not present:
        raise DataError(f"none of the {split} samples of the run has a patch file", path=data_root,
                        hint="give the same --data-dir the model was trained on")
    subset = patches.subset(present)
    return PatchH5Dataset(subset.files, subset.labels, transform)


def evaluate_checkpoint(checkpoint: str | Path, data_root: str | Path, out_dir: str | Path,
                        split: str = "test", batch_size: int = 64) -> dict[str, Any]:
    """Accuracy, macro F1, one-vs-rest AUC and confusion matrix of a patch checkpoint on one split.

    `data_root` is an ImageFolder root (its `<split>/` folder is used) or the HDF5 `--data-dir` of the
    run (the samples the run held out as `split` are used). Writes, run-directory style,
    `out_dir/metrics/<split>_metrics.json`, `out_dir/metrics/<split>_predictions.csv` and
    `out_dir/plots/<split>_{confusion_matrix,roc}.png`; returns the metrics.
    """
    model, info = load_patch_checkpoint(checkpoint, _device())
    dataset = _labelled_split(info, Path(data_root), split)
    metrics = _report(model, info, dataset, dataset.patch_labels(), split, RunLayout.create(out_dir), batch_size)
    return {**metrics, "checkpoint": str(checkpoint)}


class _PredictionInputs(Dataset):
    """Unlabelled inputs for prediction; a file that fails to read yields an error message instead."""

    def __init__(self, source: Path, items: list[Path] | PatchH5Dataset, spec: TransformSpec):
        self.source, self.items, self.spec = source, items, spec
        self.transform = build_transform(spec, train=False)

    def __len__(self) -> int:
        return len(self.items)

    def names(self) -> list[str]:
        if isinstance(self.items, PatchH5Dataset):
            return [f"{self.source.name}:{i}" for i in range(len(self.items))]
        return [str(p.relative_to(self.source)) if p != self.source else p.name for p in self.items]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        try:
            image = self.items.read(index) if isinstance(self.items, PatchH5Dataset) else read_rgb(self.items[index])
        except DataError as exc:
            return torch.zeros(3, self.spec.img_size, self.spec.img_size), exc.one_line()
        return self.transform(image), ""


def _prediction_inputs(images: Path) -> tuple[list[Path] | PatchH5Dataset, Path]:
    if images.is_dir():
        files = list_images(images)
        if not files:
            raise DataError("no image files in the folder", path=images,
                            hint="give a folder of PNG/JPEG/TIFF images or an HDF5 patch file")
        return files, images
    if images.suffix.lower() in (".h5", ".hdf5"):
        info = inspect_patch_file(images, images.stem)
        return PatchH5Dataset([info]), images
    if images.is_file():
        return [images], images
    raise DataError("images not found", path=images, hint="give a folder of images or an HDF5 patch file")


def _fingerprint(paths: Sequence[Path]) -> str:
    return files_fingerprint([Path(p).resolve() for p in paths])


def predict_images(checkpoints: Sequence[str | Path] | str | Path, images: str | Path, out_dir: str | Path,
                   batch_size: int = 64) -> Path:
    """Class probabilities of every image (ensemble mean over checkpoints) as `out_dir/predictions.csv`.

    Columns: `image` (path relative to the folder, or `<file>:<index>` for HDF5), `predicted_label`,
    `confidence`, `prob_<class>` per class (HDF5 input adds the patch `index`). Unreadable images are reported together at the end (the
    others are still written). A rerun with the same checkpoints and images reuses the CSV.
    """
    from mambascope.errors import BatchError

    checkpoints = [Path(checkpoints)] if isinstance(checkpoints, (str, Path)) else [Path(c) for c in checkpoints]
    if not checkpoints:
        raise ConfigError("no checkpoint given", hint="pass at least one --checkpoint")
    images = Path(images)
    out_csv = Path(out_dir) / PREDICTIONS_FILE
    items, source = _prediction_inputs(images)
    key = _fingerprint([*checkpoints, *(items if isinstance(items, list) else [images])])
    stamp = Path(out_dir) / "predictions.fingerprint"
    if out_csv.is_file() and stamp.is_file() and stamp.read_text().strip() == key:
        return out_csv

    device = _device()
    probs, failures, class_names, names = None, {}, None, None
    for checkpoint in checkpoints:
        model, info = load_patch_checkpoint(checkpoint, device)
        if class_names is not None and info.class_names != class_names:
            raise CheckpointError(f"checkpoint classes {info.class_names} differ from {class_names}",
                                  path=checkpoint, hint="ensemble only checkpoints trained on the same classes")
        class_names = info.class_names
        dataset = _PredictionInputs(source, items, info.transform)
        names = dataset.names()
        chunks = []
        offset = 0
        with torch.no_grad():
            for batch, errors in DataLoader(dataset, batch_size=batch_size):
                chunks.append(torch.softmax(model(batch.to(device)).float(), 1).cpu().numpy())
                failures.update({offset + i: e for i, e in enumerate(errors) if e})
                offset += len(errors)
        current = np.concatenate(chunks)
        probs = current if probs is None else probs + current
    probs /= len(checkpoints)
    keep = [i for i in range(len(names)) if i not in failures]
    extra = {"index": keep} if isinstance(items, PatchH5Dataset) else None
    write_predictions(out_csv, [names[i] for i in keep], probs[keep], class_names, extra=extra)
    if failures:
        stamp.unlink(missing_ok=True)
        listed = "; ".join(failures[i] for i in sorted(failures)[:5])
        raise BatchError(f"{len(failures)} of {len(names)} images could not be read ({listed})", path=out_csv,
                         hint="the other predictions were written; fix or remove the listed files")
    write_text_atomic(stamp, key + "\n")
    return out_csv

