"""Train SegMamba (or any registered 3D model) on BraTS case folders with Lightning and MONAI.

Dice + BCE on the TC/WT/ET channels; AdamW or SGD with polynomial learning-rate decay; random patches
biased to tumour for training, whole volumes for validation through a Gaussian-weighted sliding window
(overlap 0.5); Dice and HD95 per region (see `mambascope.eval.segmentation` for empty masks). The run
directory gets `config.yaml`, `splits.json`, `checkpoints/{best,last}.ckpt` (by mean validation Dice),
`logs/` (TensorBoard), `plots/{training_curves.png, val_predictions_epoch_<n>.png}`, `predictions/` and
`metrics/final_metrics.json` (the best checkpoint scored on validation and test cases in input space).
Checkpoints hold `family: "seg"` and everything needed to rebuild the model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from torch import nn

from mambascope.atomic import write_text_atomic
from mambascope.config import write_resolved_config
from mambascope.data.brats import (
    REGIONS,
    BratsCase,
    brats_transforms,
    check_case,
    common_convention,
    find_cases,
    load_splits,
    save_splits,
    split_cases,
)
from mambascope.errors import CheckpointError, ConfigError
from mambascope.eval.predict_seg import (
    EMPTY_MASK_RULES,
    InferenceSettings,
    plain_tensor,
    predict_cases,
    sliding_window_logits,
)
from mambascope.eval.seg_plots import plot_training_curves, plot_val_predictions
from mambascope.eval.segmentation import region_scores
from mambascope.models import create_model
from mambascope.train.runs import RunLayout, build_trainer

OPTIMIZERS = ("adamw", "sgd")
MONITOR = "val_dice_mean"


class DiceBCELoss(nn.Module):
    """Soft Dice (MONAI, sigmoid per channel) + binary cross-entropy on overlapping region channels.

    MONAI's DiceCELoss would use softmax cross-entropy for more than one channel, which treats TC, WT and
    ET as exclusive classes; they are nested, so each channel gets its own BCE.
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0):
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5)
        self.bce = nn.BCEWithLogitsLoss()
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = target.float()
        return self.dice_weight * self.dice(logits, target) + self.bce_weight * self.bce(logits, target)


def _spacing(tensor: torch.Tensor) -> list[float]:
    """Voxel spacing (mm) of the first item of a collated MetaTensor batch, from its affine."""
    affine = torch.as_tensor(getattr(tensor, "affine", torch.eye(4)), dtype=torch.float64)
    affine = affine[0] if affine.ndim == 3 else affine
    return affine[:3, :3].norm(dim=0).tolist()


class SegmentationModule(lightning.LightningModule):
    """One registered 3D model, its loss, optimiser schedule and sliding-window validation."""

    def __init__(self, model_name: str = "segmamba", model_kwargs: dict[str, Any] | None = None, *,
                 patch_size: Sequence[int] = (128, 128, 128), et_label: int = 4, convention: str = "2021",
                 optimizer: str = "adamw", lr: float = 1e-4, weight_decay: float = 1e-5, momentum: float = 0.99,
                 poly_power: float = 0.9, max_epochs: int = 300, overlap: float = 0.5, sw_batch_size: int = 2,
                 regions: Sequence[str] = REGIONS, family: str = "seg"):
        super().__init__()
        if family != "seg":
            raise ConfigError(f"a segmentation module cannot hold a {family!r} model")
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {optimizer!r}", hint=f"choose one of: {', '.join(OPTIMIZERS)}")
        self.save_hyperparameters()
        self.model = create_model(model_name, **(model_kwargs or {}))
        self.loss_fn = DiceBCELoss()
        self.epoch_train_losses: list[float] = []
        self.last_val_metrics: dict[str, float] = {}
        self.val_sample: dict[str, np.ndarray] | None = None
        self._val_scores: list[tuple[int, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def inference_settings(self, device: str | torch.device = "cpu", tta: bool = False) -> InferenceSettings:
        hp = self.hparams
        return InferenceSettings(roi_size=tuple(hp.patch_size), overlap=hp.overlap, sw_batch_size=hp.sw_batch_size,
                                 tta=tta, device=str(device))

    def on_train_epoch_start(self) -> None:
        self.epoch_train_losses = []

    def training_step(self, batch: dict, _batch_idx: int) -> torch.Tensor:
        logits = self.model(plain_tensor(batch["image"]))
        loss = self.loss_fn(logits, plain_tensor(batch["label"]))
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=batch["image"].shape[0], sync_dist=True)
        self.epoch_train_losses.append(float(loss.detach()))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_scores = []
        self.val_sample = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        spacing = _spacing(batch["label"])
        image, target = plain_tensor(batch["image"]), plain_tensor(batch["label"])
        logits = sliding_window_logits(self.model, image, self.inference_settings(self.device))
        loss = self.loss_fn(logits, target)
        pred = torch.sigmoid(logits.float()) > 0.5
        dice, hd95 = region_scores(pred, target, spacing)
        values = torch.tensor([*dice[0], *hd95[0], float(loss)], dtype=torch.float64)
        self._val_scores.append((int(batch["index"][0]), values))
        if batch_idx == 0 and self.val_sample is None:
            self.val_sample = {"image": image[0, -1].float().cpu().numpy(),
                               "target": target[0].bool().cpu().numpy(), "pred": pred[0].cpu().numpy(),
                               "case_id": str(batch["case_id"][0])}

    def _gather_scores(self) -> np.ndarray:
        """(cases, 2 * regions + 1) rows of every validation case once, whatever the number of ranks."""
        width = 2 * len(self.hparams.regions) + 1
        index = torch.tensor([i for i, _ in self._val_scores], dtype=torch.long, device=self.device)
        rows = (torch.stack([v for _, v in self._val_scores]) if self._val_scores
                else torch.zeros(0, width, dtype=torch.float64)).to(self.device)
        if self.trainer.world_size > 1:
            index, rows = self.all_gather(index).flatten(0, 1), self.all_gather(rows).flatten(0, 1)
        _, first = np.unique(index.cpu().numpy(), return_index=True)
        return rows.cpu().numpy()[first]

    def on_validation_epoch_end(self) -> None:
        rows = self._gather_scores()
        self._val_scores = []
        if rows.size == 0:
            return
        n = len(self.hparams.regions)
        means = rows.mean(axis=0)
        values = {f"val_dice_{r}": means[i] for i, r in enumerate(self.hparams.regions)}
        values.update({f"val_hd95_{r}": means[n + i] for i, r in enumerate(self.hparams.regions)})
        values.update({"val_dice_mean": means[:n].mean(), "val_hd95_mean": means[n:2 * n].mean(),
                       "val_loss": means[-1]})
        self.last_val_metrics = {k: float(v) for k, v in values.items()}
        # identical on every rank (computed from the gathered set), so no further reduction
        self.log_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in self.last_val_metrics.items()},
                      prog_bar=False, rank_zero_only=False)
        self.log("val_dice", self.last_val_metrics["val_dice_mean"], prog_bar=True, rank_zero_only=False)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        if hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=True)
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=True,
                                        weight_decay=hp.weight_decay)
        schedule = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max(1, hp.max_epochs),
                                                         power=hp.poly_power)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}


class SegRunReport(lightning.Callback):
    """Writes `training_curves.png` every epoch and `val_predictions_epoch_<n>.png` every validation.

    Keeps the per-epoch history in checkpoints, so a resumed run continues its curves.
    """

    def __init__(self, layout: RunLayout):
        self.layout = layout
        self.history: dict[str, list[float]] = {}

    def on_validation_end(self, trainer: lightning.Trainer, pl_module: SegmentationModule) -> None:
        if trainer.sanity_checking or not pl_module.last_val_metrics:
            return
        for key, value in pl_module.last_val_metrics.items():
            self.history.setdefault(key, []).append(value)
        sample = pl_module.val_sample
        if trainer.is_global_zero and sample is not None:
            epoch = trainer.current_epoch
            plot_val_predictions(sample["image"], sample["target"], sample["pred"],
                                 self.layout.plots / f"val_predictions_epoch_{epoch}.png",
                                 title=f"{sample['case_id']}, epoch {epoch}, "
                                       f"val Dice {pl_module.last_val_metrics['val_dice_mean']:.3f}")

    def on_train_epoch_end(self, trainer: lightning.Trainer, pl_module: SegmentationModule) -> None:
        if pl_module.epoch_train_losses:
            self.history.setdefault("train_loss", []).append(float(np.mean(pl_module.epoch_train_losses)))
        if trainer.is_global_zero:
            plot_training_curves(self.history, self.layout.plots / "training_curves.png")

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: [float(x) for x in v] for k, v in state_dict.get("history", {}).items()}


@dataclass
class SegTrainConfig:
    """Everything a segmentation run needs; `segment train` options map one to one onto these fields."""

    data: Path
    output_dir: Path = Path("results")
    run_name: str = "segmamba"
    model: str = "segmamba"
    patch_size: tuple[int, int, int] = (128, 128, 128)
    base_channels: int = 48
    depths: tuple[int, ...] = (2, 2, 2, 2)
    d_state: int = 16
    gradient_checkpointing: bool = False
    backend: str = "auto"
    batch_size: int = 1
    samples_per_volume: int = 2
    epochs: int = 300
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-5
    momentum: float = 0.99
    poly_power: float = 0.9
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0
    precision: str = "auto"
    accumulate: int = 1
    patience: int = 50
    num_workers: int = 4
    cache_rate: float = 0.0
    overlap: float = 0.5
    sw_batch_size: int = 2
    tta: bool = False
    resume: bool = False
    devices: str = "auto"
    accelerator: str = "auto"
    strategy: str = "auto"
    wandb_project: str | None = None
    progress_bar: bool = True
    extra_model_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def model_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"in_channels": 4, "out_channels": len(REGIONS)}
        if self.model == "segmamba":
            kwargs.update(base_channels=self.base_channels, depths=list(self.depths), d_state=self.d_state,
                          gradient_checkpointing=self.gradient_checkpointing, backend=self.backend)
        return {**kwargs, **self.extra_model_kwargs}


def resolve_precision(precision: str) -> str:
    """"auto": bf16 (or fp16) mixed precision on a CUDA GPU, full fp32 on the CPU."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


@dataclass
class SegTrainResult:
    """Where a finished run put things, and its final metrics."""

    layout: RunLayout
    best_checkpoint: Path
    final_metrics: dict[str, Any]


def _prepare_splits(cfg: SegTrainConfig, layout: RunLayout, cases: Sequence[BratsCase]) -> dict[str, list[str]]:
    path = layout.root / "splits.json"
    ids = [c.case_id for c in cases]
    if path.is_file():
        return load_splits(path, ids)
    splits = split_cases(ids, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    save_splits(path, splits)
    return splits


def _loaders(cfg: SegTrainConfig, cases: dict[str, BratsCase], splits: dict[str, list[str]], et_label: int):
    from monai.data import CacheDataset, DataLoader, Dataset

    train_records = [cases[i].as_record() for i in splits["train"]]
    val_records = [{**cases[case_id].as_record(), "index": n} for n, case_id in enumerate(splits["val"])]
    train_tf = brats_transforms("train", et_label, cfg.patch_size, cfg.samples_per_volume)
    val_tf = brats_transforms("val", et_label)
    if cfg.cache_rate > 0:
        train_ds = CacheDataset(train_records, train_tf, cache_rate=cfg.cache_rate, num_workers=cfg.num_workers)
        val_ds = CacheDataset(val_records, val_tf, cache_rate=cfg.cache_rate, num_workers=cfg.num_workers)
    else:
        train_ds, val_ds = Dataset(train_records, train_tf), Dataset(val_records, val_tf)
    persistent = cfg.num_workers > 0
    train = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
                       persistent_workers=persistent, pin_memory=torch.cuda.is_available())
    val = DataLoader(val_ds, batch_size=1, shuffle=False, num_workers=cfg.num_workers,
                     persistent_workers=persistent)
    return train, val


def check_run_dir(cfg: SegTrainConfig) -> None:
    """Refuse to overwrite a run that has checkpoints unless asked to resume it."""
    if not cfg.resume and (cfg.run_dir / "checkpoints" / "last.ckpt").is_file():
        raise ConfigError(f"run directory already holds checkpoints: {cfg.run_dir}",
                          hint="pass --resume to continue it, or choose another --run-name")


def train_segmentation(cfg: SegTrainConfig, write_config: bool = True) -> SegTrainResult:
    """Run (or resume) training, then score the best checkpoint on the validation and test cases."""
    from monai.utils import set_determinism

    check_run_dir(cfg)
    cases_list = find_cases(cfg.data, require_label=True)
    convention = common_convention(cases_list)
    for case in cases_list:
        check_case(case, cfg.patch_size)
    cases = {c.case_id: c for c in cases_list}
    layout = RunLayout.create(cfg.run_dir)
    if write_config:
        write_resolved_config(layout.root, asdict(cfg))
    splits = _prepare_splits(cfg, layout, cases_list)
    lightning.seed_everything(cfg.seed, workers=True, verbose=False)
    set_determinism(seed=cfg.seed)
    module = SegmentationModule(
        cfg.model, cfg.model_kwargs(), patch_size=list(cfg.patch_size), et_label=convention.et_label,
        convention=convention.name, optimizer=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
        momentum=cfg.momentum, poly_power=cfg.poly_power, max_epochs=cfg.epochs, overlap=cfg.overlap,
        sw_batch_size=cfg.sw_batch_size,
    )
    train_loader, val_loader = _loaders(cfg, cases, splits, convention.et_label)
    devices: int | str = int(cfg.devices) if str(cfg.devices).isdigit() else cfg.devices
    trainer = build_trainer(
        layout, max_epochs=cfg.epochs, monitor=MONITOR, mode="max", patience=cfg.patience,
        precision=resolve_precision(cfg.precision), devices=devices, accelerator=cfg.accelerator,
        accumulate_grad_batches=cfg.accumulate, strategy=cfg.strategy, wandb_project=cfg.wandb_project,
        extra_callbacks=[SegRunReport(layout)], progress_bar=cfg.progress_bar, log_every_n_steps=1,
    )
    trainer.fit(module, train_loader, val_loader, ckpt_path=layout.resume_checkpoint() if cfg.resume else None)
    best = layout.best_checkpoint if layout.best_checkpoint.is_file() else layout.last_checkpoint
    final: dict[str, Any] = {}
    if trainer.is_global_zero:
        final = evaluate_run(best, layout, cases, splits, trainer.current_epoch, cfg.tta)
    return SegTrainResult(layout=layout, best_checkpoint=best, final_metrics=final)


def evaluate_run(checkpoint: Path, layout: RunLayout, cases: dict[str, BratsCase], splits: dict[str, list[str]],
                 epochs_trained: int, tta: bool = False) -> dict[str, Any]:
    """Predict validation and test cases with `checkpoint` into `predictions/<split>/`, write final metrics."""
    model, info = load_seg_checkpoint(checkpoint)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    settings = InferenceSettings(roi_size=info.patch_size, overlap=info.overlap, sw_batch_size=info.sw_batch_size,
                                 tta=tta, device=device)
    final: dict[str, Any] = {"checkpoint": str(checkpoint), "monitor": MONITOR, "epochs_trained": epochs_trained,
                             "tta": tta, "regions": list(REGIONS), "empty_masks": EMPTY_MASK_RULES, "splits": {}}
    for split in ("val", "test"):
        if not splits.get(split):
            continue
        report = predict_cases(model, [cases[i] for i in splits[split]], layout.root / "predictions" / split,
                               settings)
        final["splits"][split] = {"mean": report.summary, "failures": report.failures,
                                  "per_case": [{"case_id": r.case_id, **(r.metrics or {})} for r in report.results]}
    write_text_atomic(layout.final_metrics, json.dumps(final, indent=2) + "\n")
    return final


@dataclass(frozen=True)
class SegCheckpointInfo:
    """What a segmentation checkpoint says about its model and how it was trained."""

    model_name: str
    model_kwargs: dict[str, Any]
    patch_size: tuple[int, int, int]
    et_label: int
    convention: str
    overlap: float
    sw_batch_size: int
    regions: tuple[str, ...]


def load_seg_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, SegCheckpointInfo]:
    """Rebuild a trained segmentation model (eval mode) from a Lightning checkpoint (weights_only load)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint not found", path=path, hint="pass a .ckpt from <run>/checkpoints/")
    try:
        state = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean an unreadable file
        raise CheckpointError(f"cannot read checkpoint ({type(exc).__name__}: {exc})", path=path,
                              hint="pass a checkpoint written by `mambascope segment train`") from None
    hp = state.get("hyper_parameters", {}) if isinstance(state, dict) else {}
    if hp.get("family") != "seg":
        raise CheckpointError(f"not a segmentation checkpoint (family {hp.get('family')!r})", path=path,
                              hint="use a checkpoint from `mambascope segment train`")
    info = SegCheckpointInfo(model_name=hp["model_name"], model_kwargs=dict(hp.get("model_kwargs") or {}),
                             patch_size=tuple(int(p) for p in hp["patch_size"]), et_label=int(hp["et_label"]),
                             convention=str(hp["convention"]), overlap=float(hp["overlap"]),
                             sw_batch_size=int(hp["sw_batch_size"]), regions=tuple(hp["regions"]))
    model = create_model(info.model_name, **info.model_kwargs)
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not match the {info.model_name} configuration ({exc})",
                              path=path, hint="the checkpoint may be corrupt or from another version") from None
    return model.to(device).eval(), info
