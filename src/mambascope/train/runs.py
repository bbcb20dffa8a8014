"""The run directory every training command writes, and the Lightning trainer that fills it.

Shared by the MIL, patch and segmentation trainers so their runs look the same on disk:
`config.yaml`, `checkpoints/{best,last}.ckpt`, `logs/` (TensorBoard), `plots/`, `metrics/`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mambascope.errors import ConfigError

if TYPE_CHECKING:
    import lightning


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run directory (see design.md)."""

    root: Path
    checkpoints: Path
    logs: Path
    plots: Path
    metrics: Path

    @classmethod
    def create(cls, root: str | Path) -> RunLayout:
        """Make (or reuse) the run directory and its sub-folders."""
        root = Path(root)
        layout = cls(root=root, checkpoints=root / "checkpoints", logs=root / "logs",
                     plots=root / "plots", metrics=root / "metrics")
        for folder in (layout.root, layout.checkpoints, layout.logs, layout.plots, layout.metrics):
            folder.mkdir(parents=True, exist_ok=True)
        return layout

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def final_metrics(self) -> Path:
        return self.metrics / "final_metrics.json"

    def resume_checkpoint(self) -> Path | None:
        """`last.ckpt` when an earlier run of this directory left one, so `fit` can continue it."""
        return self.last_checkpoint if self.last_checkpoint.is_file() else None


def _loggers(layout: RunLayout, wandb_project: str | None) -> list[Any]:
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers: list[Any] = [TensorBoardLogger(save_dir=str(layout.logs), name="", version="")]
    if wandb_project:
        try:
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(WandbLogger(project=wandb_project, save_dir=str(layout.logs),
                                       name=layout.root.name))
        except ModuleNotFoundError as exc:
            raise ConfigError("Weights & Biases logging was asked for but wandb is not installed",
                              hint="pip install 'mambascope[wandb]' or drop --wandb-project") from exc
    return loggers


#: float32 matrix products on CUDA GPUs: TF32 tensor cores ("high") or full float32 ("highest")
MATMUL_PRECISIONS = ("high", "highest")


def set_matmul_precision(precision: Literal["high", "highest"]) -> None:
    """float32 matrix products on CUDA GPUs for this process: TF32 tensor cores ("high": inputs rounded to
    a 10-bit mantissa, sums in float32, several times faster) or full float32 ("highest", PyTorch's
    default). CPUs and mixed-precision products are unaffected."""
    import torch

    if precision not in MATMUL_PRECISIONS:
        raise ConfigError(f"unknown matmul precision {precision!r}",
                          hint=f"choose one of: {', '.join(MATMUL_PRECISIONS)}")
    torch.backends.cuda.matmul.allow_tf32 = precision == "high"


def build_trainer(
    layout: RunLayout,
    *,
    max_epochs: int,
    monitor: str,
    mode: Literal["min", "max"],
    patience: int | None,
    precision: str = "32-true",
    matmul_precision: Literal["high", "highest"] = "highest",
    devices: int | str | Sequence[int] = "auto",
    accelerator: str = "auto",
    accumulate_grad_batches: int = 1,
    strategy: str | Any = "auto",
    wandb_project: str | None = None,
    deterministic: bool | Literal["warn"] = True,
    extra_callbacks: Sequence[Any] = (),
    num_nodes: int = 1,
    progress_bar: bool = True,
    log_every_n_steps: int = 10,
    use_distributed_sampler: bool = True,
) -> lightning.Trainer:
    """A Lightning trainer writing `best.ckpt` (by `monitor`) and `last.ckpt` into the run directory.

    Early stopping watches `monitor` with `patience` epochs (None or 0 turns it off). Under SLURM,
    Lightning's SLURMEnvironment picks up ranks and nodes by itself (`num_nodes` must match `--nodes`).
    `deterministic=True` uses deterministic algorithms where torch has them and only warns for ops that
    have none on the GPU (scatter/index_add backward), so a run never dies for it.
    `use_distributed_sampler=False` leaves DDP sharding to the caller's loaders (Lightning otherwise
    shuffles every training loader it shards). `matmul_precision` is set for the process
    (`set_matmul_precision`).
    """
    import lightning
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

    if mode not in ("min", "max"):
        raise ConfigError(f"monitor mode must be 'min' or 'max', got {mode!r}")
    if max_epochs < 1:
        raise ConfigError(f"max_epochs must be at least 1, got {max_epochs}")
    if accumulate_grad_batches < 1:
        raise ConfigError(f"gradient accumulation must be at least 1, got {accumulate_grad_batches}")
    checkpoint = ModelCheckpoint(
        dirpath=str(layout.checkpoints), filename="best", monitor=monitor, mode=mode, save_top_k=1,
        save_last=True, auto_insert_metric_name=False, enable_version_counter=False,
    )
    callbacks: list[Any] = [checkpoint, LearningRateMonitor(logging_interval="epoch")]
    if patience:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=patience))
    callbacks.extend(extra_callbacks)
    set_matmul_precision(matmul_precision)
    return lightning.Trainer(
        default_root_dir=str(layout.root),
        max_epochs=max_epochs,
        precision=precision,
        devices=devices,
        accelerator=accelerator,
        num_nodes=num_nodes,
        strategy=strategy,
        accumulate_grad_batches=accumulate_grad_batches,
        deterministic="warn" if deterministic is True else deterministic,
        callbacks=callbacks,
        logger=_loggers(layout, wandb_project),
        enable_progress_bar=progress_bar,
        log_every_n_steps=log_every_n_steps,
        use_distributed_sampler=use_distributed_sampler,
    )
