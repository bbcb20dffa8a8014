"""The Lightning module that trains one MIL aggregator on bags of slide features.

Its hyper-parameters (saved in every checkpoint) carry `family: "mil"`, the model name, its keyword
arguments, the class names and the feature width, so a checkpoint alone rebuilds the model.
Validation metrics are computed once per epoch on every validation bag, gathered across DDP ranks
and de-duplicated by bag index, so one process and several report the same numbers.
"""

from __future__ import annotations

from typing import Any

import lightning
import numpy as np
import torch

from mambascope.data.bags import BagDataset, single_bag
from mambascope.errors import ConfigError
from mambascope.eval.classification import classification_metrics
from mambascope.models import create_model
from mambascope.train.losses import make_loss
from mambascope.train.mil_options import SCHEDULERS


class MILModule(lightning.LightningModule):
    """AdamW + (warm-up then cosine/step) schedule; CE or focal loss; one bag per step."""

    def __init__(self, model_name: str, in_dim: int, class_names: list[str], model_kwargs: dict[str, Any] | None = None,
                 *, lr: float = 2e-4, weight_decay: float = 1e-4, scheduler: str = "cosine", warmup_epochs: int = 0,
                 step_size: int = 10, step_gamma: float = 0.5, loss: str = "ce", focal_gamma: float = 2.0,
                 class_weights: list[float] | None = None, max_epochs: int = 20, family: str = "mil"):
        super().__init__()
        if family != "mil":
            raise ConfigError(f"a MIL module cannot hold a {family!r} model")
        if scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler {scheduler!r}", hint=f"choose one of: {', '.join(SCHEDULERS)}")
        self.save_hyperparameters()
        self.model = create_model(model_name, in_dim=in_dim, num_classes=len(class_names), **(model_kwargs or {}))
        self.loss_fn = make_loss(loss, class_weights, focal_gamma)
        self._val_outputs: list[tuple[int, torch.Tensor, int]] = []

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None):
        return self.model(features, coords)

    def _bag_output(self, batch: dict):
        """The model on one bag; a grid the loader built goes along (only grid models get one)."""
        if batch.get("grid") is not None:
            return self.model(batch["features"], batch["coords"], grid=batch["grid"])
        return self.model(batch["features"], batch["coords"])

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        """Everything but the coords and the grid: only grid-building models read coords, on the host
        (a copy on the GPU would cost a synchronisation every step), and the model moves its grid."""
        host = ("coords", "grid")
        moved = super().transfer_batch_to_device({k: v for k, v in batch.items() if k not in host}, device,
                                                 dataloader_idx)
        return {**moved, **{k: batch[k] for k in host if k in batch}}

    def training_step(self, batch: dict, _batch_idx: int) -> torch.Tensor:
        out = self._bag_output(batch)
        loss = self.loss_fn(out.logits.unsqueeze(0), batch["label"].view(1))
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
        return loss

    def validation_step(self, batch: dict, _batch_idx: int) -> None:
        out = self._bag_output(batch)
        probs = torch.softmax(out.logits.float(), dim=-1).detach()
        self._val_outputs.append((int(batch["index"]), probs, int(batch["label"])))

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def _gather_validation(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels, probs) of every validation bag once, in bag order, whatever the number of ranks."""
        num_classes = len(self.hparams.class_names)
        if self._val_outputs:
            index = torch.tensor([o[0] for o in self._val_outputs], device=self.device)
            probs = torch.stack([o[1] for o in self._val_outputs])
            labels = torch.tensor([o[2] for o in self._val_outputs], device=self.device)
        else:
            index = torch.zeros(0, dtype=torch.long, device=self.device)
            probs = torch.zeros(0, num_classes, device=self.device)
            labels = torch.zeros(0, dtype=torch.long, device=self.device)
        if self.trainer.world_size > 1:
            index, probs, labels = (self.all_gather(t).flatten(0, 1) for t in (index, probs, labels))
        index_np = index.cpu().numpy()
        _, first = np.unique(index_np, return_index=True)
        order = first[np.argsort(index_np[first])]
        return labels.cpu().numpy()[order], probs.float().cpu().numpy()[order]

    def on_validation_epoch_end(self) -> None:
        labels, probs = self._gather_validation()
        self._val_outputs = []
        if labels.size == 0:
            return
        metrics = classification_metrics(labels, probs, self.hparams.class_names)
        nll = -np.log(np.clip(probs[np.arange(labels.size), labels], 1e-12, None)).mean()
        values = {"val_loss": float(nll), "val_accuracy": metrics["accuracy"],
                  "val_balanced_accuracy": metrics["balanced_accuracy"], "val_macro_f1": metrics["macro_f1"],
                  "val_auc": float("nan") if metrics["auc"] is None else metrics["auc"]}
        # identical on every rank (computed from the gathered set): the DDP mean leaves them unchanged
        self.log_dict({k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in values.items()},
                      sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # fused: one kernel for all parameters instead of ~10 per tensor; at one bag per step the
        # optimizer's launches were a third of abmil-gated's step time (benchmarks/RESULTS.md)
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=True)
        sched = torch.optim.lr_scheduler
        main_epochs = max(1, hp.max_epochs - hp.warmup_epochs)
        if hp.scheduler == "cosine":
            main = sched.CosineAnnealingLR(optimizer, T_max=main_epochs, eta_min=hp.lr * 0.01)
        elif hp.scheduler == "step":
            main = sched.StepLR(optimizer, step_size=hp.step_size, gamma=hp.step_gamma)
        else:
            main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
        if hp.warmup_epochs > 0:
            warmup = sched.LinearLR(optimizer, start_factor=1.0 / (hp.warmup_epochs + 1), total_iters=hp.warmup_epochs)
            main = sched.SequentialLR(optimizer, [warmup, main], milestones=[hp.warmup_epochs])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": main, "interval": "epoch"}}


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class BagDataModule(lightning.LightningDataModule):
    """Loaders of one bag per step, built inside each process so DDP shards them by the real rank.

    `sampler`: `random` (shuffled each epoch), `weighted` (class-balanced draws with replacement) or
    `sequential` (file order). Under DDP the same order is split across ranks (rank r takes every
    world-th bag), so `sequential` on k ranks steps through the same bags as one process
    accumulating k; validation is split without shuffling and gathered back by the module.
    `pin_memory` (for GPU training) stages each bag in page-locked memory, so that its copy to the
    device does not hold up the step.
    """

    def __init__(self, train: BagDataset, val: BagDataset, sampler: str, class_weights: list[float], seed: int,
                 num_workers: int = 0, pin_memory: bool = False):
        super().__init__()
        self.train, self.val = train, val
        self.sampler, self.class_weights, self.seed, self.num_workers = sampler, class_weights, seed, num_workers
        self.pin_memory = pin_memory

    def _loader(self, dataset: BagDataset, sampler) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(dataset, batch_size=1, sampler=sampler, collate_fn=single_bag,
                                           num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                                           pin_memory=self.pin_memory)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
        from torch.utils.data import DistributedSampler, RandomSampler, WeightedRandomSampler

        distributed = _world_size() > 1
        if self.sampler == "weighted":
            weights = [self.class_weights[bag.label] for bag in self.train.bags]
            draws = WeightedRandomSampler(weights, num_samples=len(self.train), replacement=True,
                                          generator=torch.Generator().manual_seed(self.seed))
            sampler = DistributedSamplerWrapper(draws, shuffle=False) if distributed else draws
        elif distributed:
            sampler = DistributedSampler(self.train, shuffle=self.sampler == "random", seed=self.seed)
        elif self.sampler == "random":
            sampler = RandomSampler(self.train, generator=torch.Generator().manual_seed(self.seed))
        else:
            sampler = None
        return self._loader(self.train, sampler)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        from torch.utils.data import DistributedSampler

        return self._loader(self.val, DistributedSampler(self.val, shuffle=False) if _world_size() > 1 else None)
