"""`mambascope train histomamba` and `mambascope train microscopic-mamba`: patch / microscopy classifiers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from mambascope.cli.options import config_option, save_run_config


def _floats(text: str | None) -> list[float] | None:
    if text is None or text == "":
        return None
    try:
        return [float(v) for v in str(text).split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str | None) -> list[int] | None:
    values = _floats(text)
    if values is not None and any(v != int(v) for v in values):
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}")
    return None if values is None else [int(v) for v in values]


def _training_options(defaults: dict[str, Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Options both trainers share; `defaults` holds each command's own defaults (its paper's recipe)."""
    options = [
        click.option("--output-dir", default=defaults["output_dir"], show_default=True,
                     type=click.Path(file_okay=False), help="Run directory (config, checkpoints, logs, metrics)."),
        click.option("--model", default=defaults["model"], show_default=True,
                     type=click.Choice(defaults["models"]), help="Model size."),
        click.option("--dims", default=None, help="Stage widths, comma-separated (overrides the size's)."),
        click.option("--depths", default=None, help="Blocks per stage, comma-separated (overrides the size's)."),
        click.option("--drop-path-rate", default=0.1, show_default=True, type=click.FloatRange(0, 1),
                     help="Stochastic depth rate of the last block (linear from 0)."),
        click.option("--img-size", default=defaults["img_size"], show_default=True, type=click.IntRange(min=8),
                     help="Model input size in pixels."),
        click.option("--batch-size", default=defaults["batch_size"], show_default=True, type=click.IntRange(min=1),
                     help="Images per batch."),
        click.option("--num-epochs", default=defaults["num_epochs"], show_default=True, type=click.IntRange(min=1),
                     help="Maximum epochs (early stopping may end sooner)."),
        click.option("--lr", default=1e-4, show_default=True, type=click.FloatRange(min=0, min_open=True),
                     help="Peak learning rate."),
        click.option("--optimizer", default=defaults["optimizer"], show_default=True,
                     type=click.Choice(["adam", "adamw"]), help="Optimiser."),
        click.option("--weight-decay", default=defaults["weight_decay"], show_default=True, type=float,
                     help="Weight decay of the optimiser."),
        click.option("--warmup-epochs", default=defaults["warmup_epochs"], show_default=True,
                     type=click.IntRange(min=0), help="Linear warm-up epochs before the cosine decay."),
        click.option("--min-lr-ratio", default=defaults["min_lr_ratio"], show_default=True,
                     type=click.FloatRange(0, 1), help="Final learning rate as a fraction of --lr."),
        click.option("--label-smoothing", default=0.0, show_default=True, type=click.FloatRange(0, 1),
                     help="Label smoothing of the cross-entropy."),
        click.option("--monitor-metric", default="val_loss", show_default=True,
                     type=click.Choice(["val_loss", "val_accuracy", "val_f1"]),
                     help="Validation metric for the best checkpoint and early stopping."),
        click.option("--early-stopping-patience", default=defaults["patience"], show_default=True,
                     type=click.IntRange(min=0), help="Epochs without improvement before stopping (0: never)."),
        click.option("--early-stopping-min-delta", default=defaults["min_delta"], show_default=True, type=float,
                     help="Smallest change that counts as an improvement."),
        click.option("--use-weighted-sampler", is_flag=True, help="Sample every class equally often."),
        click.option("--no-augment", is_flag=True, help="Train without augmentation."),
        click.option("--mean", default=None, help="Normalisation mean, e.g. 0.70,0.57,0.74 (default: "
                                                  + defaults["stats_help"] + ")."),
        click.option("--std", default=None, help="Normalisation std, three comma-separated values."),
        click.option("--no-amp", is_flag=True, help="Train in full precision (mixed precision is used on GPUs)."),
        click.option("--num-workers", default=4, show_default=True, type=click.IntRange(min=0),
                     help="Data loading processes."),
        click.option("--seed", default=42, show_default=True, type=int, help="Seed for splits, init and sampling."),
        click.option("--devices", default="auto", show_default=True, help="Devices: auto, a count, or ids."),
        click.option("--accelerator", default="auto", show_default=True, help="auto, cpu, gpu."),
        click.option("--strategy", default="auto", show_default=True, help="Lightning strategy, e.g. ddp."),
        click.option("--wandb-project", default=None, help="Also log to this Weights & Biases project."),
    ]

    def apply(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return config_option(func)

    return apply


def _config(params: dict[str, Any], recipe: str, lambda_recon: float, model_kwargs: dict[str, Any]):
    from mambascope.train.patch import PatchTrainConfig

    kwargs = {"drop_path_rate": params["drop_path_rate"], **model_kwargs}
    for name, parse in (("dims", _ints), ("depths", _ints)):
        value = parse(params[name])
        if value is not None:
            kwargs[name] = value
    devices = params["devices"]
    return PatchTrainConfig(
        model=params["model"], output_dir=params["output_dir"], model_kwargs=kwargs, img_size=params["img_size"],
        batch_size=params["batch_size"], num_epochs=params["num_epochs"], lr=params["lr"],
        weight_decay=params["weight_decay"], optimizer=params["optimizer"], warmup_epochs=params["warmup_epochs"],
        min_lr_ratio=params["min_lr_ratio"], lambda_recon=lambda_recon, label_smoothing=params["label_smoothing"],
        monitor_metric=params["monitor_metric"], early_stopping_patience=params["early_stopping_patience"],
        early_stopping_min_delta=params["early_stopping_min_delta"],
        use_weighted_sampler=params["use_weighted_sampler"], augment=not params["no_augment"], recipe=recipe,
        mean=_floats(params["mean"]), std=_floats(params["std"]), amp=not params["no_amp"],
        num_workers=params["num_workers"], seed=params["seed"],
        devices=int(devices) if str(devices).isdigit() else devices, accelerator=params["accelerator"],
        strategy=params["strategy"], wandb_project=params["wandb_project"],
    )


def _summary(result) -> None:
    if result.skipped:
        click.echo(f"run in {result.run_dir} is already complete; nothing to do")
    m = result.metrics
    auc = "n/a" if m.get("auc") is None else f"{m['auc']:.3f}"
    click.echo(f"{m.get('split', 'val')} metrics on {m.get('n')} images: accuracy {m.get('accuracy', 0):.3f}, "
               f"macro F1 {m.get('macro_f1', 0):.3f}, AUC {auc}")
    click.echo(f"best model: {result.best_model} (Lightning: {result.best_checkpoint})")
    click.echo(f"metrics, plots and TensorBoard logs in {result.run_dir}/{{metrics,plots,logs}}")


@click.command("histomamba")
@click.option("--data-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder with <sample_id>/<patch-dir-name>/<sample_id>_patches.h5 (key 'data').")
@click.option("--metadata-csv", required=True, type=click.Path(exists=True, dir_okay=False),
              help="CSV with an id column and a label column; each patch takes its sample's label.")
@click.option("--label-col", required=True, help="Label column of the metadata CSV, e.g. tissue_type.")
@click.option("--id-col", default="id", show_default=True, help="Sample id column of the metadata CSV.")
@click.option("--patch-dir-name", default="patches", show_default=True, help="Sub-folder holding the HDF5 file.")
@click.option("--val-split", default=0.15, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Fraction of samples (per class) held out for validation.")
@click.option("--test-split", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Fraction of samples (per class) held out for the final test.")
@click.option("--lambda-recon", default=0.05, show_default=True, type=click.FloatRange(min=0),
              help="Weight of the reconstruction loss (0 turns the decoder off).")
@click.option("--mamba-d-state", default=16, show_default=True, type=click.IntRange(min=1),
              help="State size of the Mamba mixers.")
@click.option("--mamba-d-conv", default=4, show_default=True, type=click.IntRange(min=1),
              help="Causal conv width of the Mamba mixers.")
@click.option("--mamba-expand", default=2, show_default=True, type=click.IntRange(min=1),
              help="Inner width of the Mamba mixers, as a multiple of the stage width.")
@click.option("--embed-stride", default=2, show_default=True, type=click.IntRange(min=2),
              help="Stride of the patch embedding (first downsampling conv).")
@_training_options({"output_dir": "histomamba_output", "model": "histomamba-base",
                    "models": ["histomamba-small", "histomamba-base", "histomamba-deep"], "img_size": 256,
                    "batch_size": 64, "num_epochs": 50, "optimizer": "adamw", "weight_decay": 0.05,
                    "warmup_epochs": 0, "min_lr_ratio": 0.01, "patience": 10, "min_delta": 0.001,
                    "stats_help": "ImageNet's"})
def histomamba(**params: Any) -> None:
    """Train HistoMamba on HDF5 patches labelled per sample (split by sample, never by patch)."""
    from mambascope.train.patch import train_histomamba

    config = _config(params, "histopathology", params["lambda_recon"],
                     {"d_state": params["mamba_d_state"], "d_conv": params["mamba_d_conv"],
                      "expand": params["mamba_expand"], "embed_stride": params["embed_stride"]})
    save_run_config(config.output_dir, params, name="cli_options.yaml")
    result = train_histomamba(config, params["data_dir"], params["metadata_csv"], params["label_col"],
                              params["id_col"], params["patch_dir_name"], params["val_split"],
                              params["test_split"])
    _summary(result)


@click.command("microscopic-mamba")
@click.option("--data-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="ImageFolder root: train/<class>/*, val/<class>/*, optionally test/<class>/*.")
@click.option("--d-state", default=16, show_default=True, type=click.IntRange(min=1), help="SS2D state size.")
@_training_options({"output_dir": "microscopic_mamba_output", "model": "microscopic-mamba-tiny",
                    "models": ["microscopic-mamba-tiny", "microscopic-mamba-small", "microscopic-mamba-base"],
                    "img_size": 224, "batch_size": 32, "num_epochs": 200, "optimizer": "adam",
                    "weight_decay": 0.0, "warmup_epochs": 10, "min_lr_ratio": 0.0, "patience": 30,
                    "min_delta": 0.0, "stats_help": "DATA_DIR/stats.json from `mambascope stats`, else computed"})
def microscopic_mamba(**params: Any) -> None:
    """Train Microscopic-Mamba on an ImageFolder tree (paper recipe: Adam 1e-4, 10 warm-up epochs, cosine)."""
    from mambascope.train.patch import train_microscopic_mamba

    config = _config(params, "microscopy", 0.0, {"d_state": params["d_state"]})
    save_run_config(config.output_dir, params, name="cli_options.yaml")
    result = train_microscopic_mamba(config, params["data_dir"])
    _summary(result)


TRAIN_COMMANDS = [histomamba, microscopic_mamba]
