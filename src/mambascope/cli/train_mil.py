"""`mambascope train mil`: train a slide-level MIL model on a features folder and a labels CSV."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mambascope.cli.options import config_option
from mambascope.train.mil_options import LOSSES, MIL_MODELS, MONITORS, PRECISIONS, SAMPLERS, SCHEDULERS
from mambascope.train.runs import MATMUL_PRECISIONS


class MappingParam(click.ParamType):
    """A YAML/JSON mapping given inline (`'{hidden_dim: 256, dropout: 0.1}'`) or as a mapping in --config."""

    name = "MAPPING"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dict[str, Any]:
        import yaml

        if isinstance(value, dict):
            return value
        try:
            parsed = yaml.safe_load(value) if value else {}
        except yaml.YAMLError:
            self.fail(f"{value!r} is not a YAML mapping", param, ctx)
        if parsed is None:
            return {}
        if not isinstance(parsed, dict):
            self.fail(f"{value!r} is not a mapping such as '{{hidden_dim: 256}}'", param, ctx)
        return parsed


def print_metrics_summary(metrics: dict[str, Any], title: str) -> None:
    """The headline metrics as a small table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auc", "n"):
        value = metrics.get(key)
        table.add_row(key, "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value)))
    Console().print(table)


@click.command("mil")
@config_option
@click.option("--features", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder of <slide_id>.h5 feature files (mambascope, CLAM or TRIDENT; CLAM .pt too).")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="CSV with slide_id, label (names or integers), optional case_id and split (train/val/test).")
@click.option("--model", type=click.Choice(MIL_MODELS), required=True, help="MIL aggregator.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run directory.")
@click.option("--model-args", type=MappingParam(), default="{}", show_default=True,
              help="Model keyword arguments as a YAML mapping, e.g. '{hidden_dim: 256, dropout: 0.1}'.")
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--folds", type=click.IntRange(min=2), default=None,
              help="Stratified k-fold by case_id instead of the CSV's split column (fold_<i>/ per fold).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for folds, sampling and init.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-4, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-4, show_default=True)
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default="cosine", show_default=True)
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Linear learning-rate warm-up before the schedule.")
@click.option("--step-size", type=click.IntRange(min=1), default=10, show_default=True, help="Epochs per step (step).")
@click.option("--step-gamma", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True)
@click.option("--loss", type=click.Choice(LOSSES), default="ce", show_default=True)
@click.option("--focal-gamma", type=click.FloatRange(min=0), default=2.0, show_default=True)
@click.option("--class-weights/--no-class-weights", default=True, show_default=True,
              help="Weight the loss by inverse class frequency of the training slides.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="random",
              show_default=True, help="Training order: shuffled, class-balanced with replacement, or fixed.")
@click.option("--max-patches", type=click.IntRange(min=1), default=None,
              help="Train on a random subset of at most this many patches per bag (evaluation uses all).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="32-true",
              show_default=True)
@click.option("--matmul-precision", type=click.Choice(MATMUL_PRECISIONS), default="high", show_default=True,
              help="float32 matrix products on CUDA GPUs: TF32 tensor cores (high) or full float32 (highest).")
@click.option("--accumulate", type=click.IntRange(min=1), default=1, show_default=True,
              help="Bags per optimizer step (gradient accumulation).")
@click.option("--monitor", type=click.Choice(list(MONITORS)), default="val_loss", show_default=True,
              help="Validation metric for the best checkpoint and early stopping.")
@click.option("--patience", type=click.IntRange(min=0), default=10, show_default=True,
              help="Early-stopping patience in epochs (0: off).")
@click.option("--devices", default="auto", show_default=True, help="Device count or ids (`2`, `0,1`); >1 uses DDP.")
@click.option("--accelerator", type=click.Choice(["auto", "cpu", "gpu", "cuda", "mps"]), default="auto",
              show_default=True)
@click.option("--strategy", default="auto", show_default=True, help="Lightning strategy (auto, ddp, ddp_spawn, ...).")
@click.option("--num-nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Nodes for multi-node DDP (SLURM: match #SBATCH --nodes).")
@click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader worker processes that read feature files (and build mamba2d's grids) while "
                   "the model trains; 2-4 keep a GPU busy.")
@click.option("--skip-missing", is_flag=True, help="Leave out CSV slides without a features file (with a warning).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from the run directory's last.ckpt; finished folds are skipped.")
@click.option("--wandb-project", default=None, help="Also log to Weights & Biases (needs the `wandb` extra).")
@click.option("--progress-bar/--no-progress-bar", default=True, show_default=True)
def train_mil_command(**params: Any) -> None:
    """Train a slide-level MIL model (ABMIL, TransMIL, MambaMIL, 2DMamba-MIL), then evaluate it.

    Writes OUT/config.yaml, OUT/checkpoints/{best,last}.ckpt, OUT/logs (TensorBoard), OUT/plots and
    OUT/metrics/final_metrics.json (test split when the CSV has one, else validation). With --folds K,
    each fold is OUT/fold_<i>/ and OUT/metrics/ holds the fold table and the ensemble's metrics.
    """
    from mambascope.train.mil import MILTrainConfig, train_mil

    result = train_mil(MILTrainConfig(**params))
    if result is None:  # a non-zero DDP rank: rank zero reports
        return
    if result.skipped_slides:
        click.echo(f"skipped {len(result.skipped_slides)} slide(s) without features: "
                   f"{', '.join(result.skipped_slides)}")
    split = result.metrics.get("split", "?")
    print_metrics_summary(result.metrics, f"{params['model']} on {split}")
    if result.fold_dirs:
        click.echo(f"folds: {', '.join(str(p) for p in result.fold_dirs)}")
        click.echo(f"fold table (mean ± std): {result.root / 'metrics' / 'folds.md'}")
    click.echo(f"wrote run to {result.root} (metrics: {result.root / 'metrics' / 'final_metrics.json'})")


TRAIN_COMMANDS = [train_mil_command]
