"""The Lightning module of the patch classifiers, and loading/exporting their checkpoints.

Everything needed to rebuild the model and its input transform travels in the checkpoint's
`hyper_parameters` (plain values only, so `torch.load(weights_only=True)` reads it): `family: "patch"`,
`model_name`, `model_kwargs`, `class_names`, `transform` (image size, mean, std, recipe), the
optimisation settings and where the data came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from mambascope.atomic import atomic_path
from mambascope.data.patch_transforms import TransformSpec
from mambascope.errors import CheckpointError
from mambascope.models import create_model
from mambascope.train.checkpoints import checkpoint_hparams, load_checkpoint_dict

FAMILY = "patch"
EXPORT_FORMAT = "mambascope-patch-v1"
MONITOR_MODES = {"val_loss": "min", "val_accuracy": "max", "val_f1": "max"}


@dataclass
class WarmupCosine:
    """Learning-rate factor per optimiser step: linear warm-up, then cosine decay to `min_ratio`.

    A callable object rather than a closure so LambdaLR saves (and restores) its settings.
    """

    warmup_steps: int
    total_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class PatchClassifierModule(L.LightningModule):
    """Cross-entropy (+ `lambda_recon` x MSE reconstruction for models that reconstruct) with warm-up/cosine."""

    def __init__(self, hparams: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters({**hparams, "family": FAMILY})
        hp = self.hparams
        self.model = create_model(hp["model_name"], num_classes=len(hp["class_names"]), **hp["model_kwargs"])
        self.reconstructs = bool(getattr(self.model, "supports_reconstruction", False)) and \
            float(hp.get("lambda_recon", 0.0)) > 0
        classes = len(hp["class_names"])
        self.val_loss = torchmetrics.MeanMetric()
        self.val_accuracy = torchmetrics.classification.MulticlassAccuracy(classes, average="micro")
        self.val_f1 = torchmetrics.classification.MulticlassF1Score(classes, average="macro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _losses(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        hp = self.hparams
        parts: dict[str, torch.Tensor] = {}
        if self.reconstructs:
            logits, reconstruction = self.model(images, return_reconstruction=True)
            parts["recon_loss"] = F.mse_loss(reconstruction.float(), images.float())
        else:
            logits = self.model(images)
        parts["cls_loss"] = F.cross_entropy(logits.float(), labels, label_smoothing=hp.get("label_smoothing", 0.0))
        loss = parts["cls_loss"] + (hp["lambda_recon"] * parts["recon_loss"] if self.reconstructs else 0.0)
        return loss, logits, parts

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss, logits, parts = self._losses(images, labels)
        size = labels.shape[0]
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=size)
        for name, value in parts.items():
            self.log(f"train_{name}", value, on_step=False, on_epoch=True, batch_size=size)
        accuracy = (logits.argmax(1) == labels).float().mean()
        self.log("train_accuracy", accuracy, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _batch_idx: int) -> None:
        images, labels = batch
        loss, logits, _ = self._losses(images, labels)
        self.val_loss.update(loss.detach(), weight=labels.shape[0])
        self.val_accuracy.update(logits.detach(), labels)
        self.val_f1.update(logits.detach(), labels)

    def on_validation_epoch_end(self) -> None:
        self.log("val_loss", self.val_loss.compute(), prog_bar=True)
        self.log("val_accuracy", self.val_accuracy.compute(), prog_bar=True)
        self.log("val_f1", self.val_f1.compute())
        for metric in (self.val_loss, self.val_accuracy, self.val_f1):
            metric.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        opt = self.hparams["optimizer"]
        optimizer_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[opt["name"]]
        optimizer = optimizer_cls(self.parameters(), lr=opt["lr"], weight_decay=opt["weight_decay"], fused=True)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        schedule = WarmupCosine(opt["warmup_epochs"] * steps_per_epoch, total, opt["min_lr_ratio"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@dataclass
class PatchCheckpointInfo:
    """What a patch checkpoint says about its model."""

    path: Path
    model_name: str
    model_kwargs: dict[str, Any]
    class_names: list[str]
    transform: TransformSpec
    hyper_parameters: dict[str, Any]


def read_patch_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(hyper_parameters, model state dict) of a Lightning `.ckpt` or an exported `best_model_patch.pth`."""
    payload = load_checkpoint_dict(path)
    hp = dict(checkpoint_hparams(payload, path))
    if hp["family"] != FAMILY:
        raise CheckpointError(f"checkpoint is of family {hp['family']!r}, not a patch classifier", path=path,
                              hint="use the command for that family (e.g. `mambascope predict --features`)")
    state = payload["state_dict"]
    if any(key.startswith("model.") for key in state):
        state = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
    return hp, state


def load_patch_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, PatchCheckpointInfo]:
    """Rebuild a patch classifier from a checkpoint, in eval mode on `device`."""
    hp, state = read_patch_checkpoint(path)
    try:
        model = create_model(hp["model_name"], num_classes=len(hp["class_names"]), **hp["model_kwargs"])
        model.load_state_dict(state)
        transform = TransformSpec(**hp["transform"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint does not match its model configuration ({exc})", path=path,
                              hint="the file may come from another mambascope version") from None
    info = PatchCheckpointInfo(Path(path), hp["model_name"], dict(hp["model_kwargs"]), list(hp["class_names"]),
                               transform, hp)
    return model.to(device).eval(), info


def export_best_model(best_ckpt: str | Path, out_path: str | Path) -> Path:
    """Write the model weights and configuration of a Lightning checkpoint as `best_model_patch.pth`."""
    payload = load_checkpoint_dict(best_ckpt)
    hp, state = read_patch_checkpoint(best_ckpt)
    export = {"format": EXPORT_FORMAT, "hyper_parameters": hp, "state_dict": state,
              "epoch": int(payload.get("epoch", -1)), "global_step": int(payload.get("global_step", -1))}
    with atomic_path(out_path) as tmp:
        torch.save(export, tmp)
    return Path(out_path)
