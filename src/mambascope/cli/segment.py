"""`mambascope segment train` and `mambascope segment predict`: 3D brain-tumour segmentation (BraTS)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mambascope.cli.options import config_option, save_run_config


def _sizes(text: str, count: int | None, what: str) -> tuple[int, ...]:
    """"128" -> (128, 128, 128); "128,128,96" -> (128, 128, 96) (count=None: any length)."""
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise click.BadParameter(f"{what}: expected comma-separated integers, got {text!r}") from None
    if count is not None and len(values) == 1:
        values = values * count
    if (count is not None and len(values) != count) or any(v < 1 for v in values):
        raise click.BadParameter(f"{what}: expected {count or 'some'} positive integers, got {text!r}")
    return values


@click.group()
def segment() -> None:
    """3D brain-tumour segmentation with SegMamba on BraTS-style NIfTI case folders."""


@segment.command("train")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of BraTS case folders (2021 or 2023 file names, with labels).")
@click.option("--output-dir", default="results", show_default=True, type=click.Path(file_okay=False),
              help="Parent folder of run directories.")
@click.option("--run-name", default="segmamba", show_default=True, help="Run directory: <output-dir>/<run-name>.")
@click.option("--patch-size", default="128", show_default=True,
              help="Training patch and sliding-window size: one number or D,H,W.")
@click.option("--base-channels", default=48, show_default=True, type=click.IntRange(min=1),
              help="Width of the first encoder stage (stages use 1, 2, 4, 8 times it).")
@click.option("--depths", default="2,2,2,2", show_default=True, help="Tri-orientated Mamba layers per stage.")
@click.option("--d-state", default=16, show_default=True, type=click.IntRange(min=1), help="Mamba state size.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward (less memory).")
@click.option("--backend", default="auto", show_default=True, help="Selective-scan backend: auto, torch, triton.")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(min=1), help="Volumes per step.")
@click.option("--samples-per-volume", default=2, show_default=True, type=click.IntRange(min=1),
              help="Random patches cut from each volume per step (2/3 centred on tumour).")
@click.option("--epochs", default=300, show_default=True, type=click.IntRange(min=1), help="Maximum epochs.")
@click.option("--optimizer", default="adamw", show_default=True, type=click.Choice(["adamw", "sgd"]))
@click.option("--lr", default=1e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--weight-decay", default=1e-5, show_default=True, type=click.FloatRange(min=0))
@click.option("--momentum", default=0.99, show_default=True, type=click.FloatRange(0, 1), help="SGD momentum.")
@click.option("--poly-power", default=0.9, show_default=True, type=click.FloatRange(min=0),
              help="Learning rate decays as (1 - epoch / epochs) ** power.")
@click.option("--val-fraction", default=0.2, show_default=True, type=click.FloatRange(0, 1))
@click.option("--test-fraction", default=0.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the split, sampling and weights.")
@click.option("--precision", default="auto", show_default=True,
              type=click.Choice(["auto", "32-true", "16-mixed", "bf16-mixed"]),
              help="auto: bf16/fp16 mixed precision on a GPU, fp32 on the CPU.")
@click.option("--accumulate", default=1, show_default=True, type=click.IntRange(min=1),
              help="Gradient accumulation steps.")
@click.option("--patience", default=50, show_default=True, type=click.IntRange(min=0),
              help="Early stopping: validations without a better mean Dice (0: never stop early).")
@click.option("--num-workers", default=4, show_default=True, type=click.IntRange(min=0))
@click.option("--cache-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of preprocessed volumes kept in memory (MONAI CacheDataset).")
@click.option("--overlap", default=0.5, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Sliding-window overlap for validation and prediction.")
@click.option("--sw-batch-size", default=2, show_default=True, type=click.IntRange(min=1),
              help="Sliding windows per forward pass.")
@click.option("--tta/--no-tta", default=False, show_default=True,
              help="Flip test-time augmentation when scoring the best checkpoint at the end.")
@click.option("--resume", is_flag=True, help="Continue the run from its last.ckpt.")
@click.option("--devices", default="auto", show_default=True, help="Devices: auto, a count, or ids.")
@click.option("--accelerator", default="auto", show_default=True, help="auto, cpu, gpu.")
@click.option("--strategy", default="auto", show_default=True, help="Lightning strategy, e.g. ddp.")
@click.option("--wandb-project", default=None, help="Also log to this Weights & Biases project.")
@config_option
def train(**params: Any) -> None:
    """Train SegMamba on BraTS cases; writes <output-dir>/<run-name>/{checkpoints,logs,plots,metrics}."""
    from mambascope.train.seg import SegTrainConfig, check_run_dir, train_segmentation

    cfg = SegTrainConfig(
        data=Path(params["data"]), output_dir=Path(params["output_dir"]), run_name=params["run_name"],
        patch_size=_sizes(params["patch_size"], 3, "--patch-size"), base_channels=params["base_channels"],
        depths=_sizes(params["depths"], None, "--depths"), d_state=params["d_state"],
        gradient_checkpointing=params["gradient_checkpointing"], backend=params["backend"],
        batch_size=params["batch_size"], samples_per_volume=params["samples_per_volume"], epochs=params["epochs"],
        optimizer=params["optimizer"], lr=params["lr"], weight_decay=params["weight_decay"],
        momentum=params["momentum"], poly_power=params["poly_power"], val_fraction=params["val_fraction"],
        test_fraction=params["test_fraction"], seed=params["seed"], precision=params["precision"],
        accumulate=params["accumulate"], patience=params["patience"], num_workers=params["num_workers"],
        cache_rate=params["cache_rate"], overlap=params["overlap"], sw_batch_size=params["sw_batch_size"],
        tta=params["tta"], resume=params["resume"], devices=params["devices"], accelerator=params["accelerator"],
        strategy=params["strategy"], wandb_project=params["wandb_project"],
    )
    check_run_dir(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg.run_dir, params)
    result = train_segmentation(cfg, write_config=False)
    for split, scores in result.final_metrics.get("splits", {}).items():
        mean = scores.get("mean") or {}
        if mean:
            click.echo(f"{split}: {mean['n_cases']} case(s), Dice TC/WT/ET "
                       f"{mean['dice_TC']:.3f}/{mean['dice_WT']:.3f}/{mean['dice_ET']:.3f} (mean {mean['dice_mean']:.3f}), "
                       f"HD95 mean {mean['hd95_mean']:.1f} mm")
    click.echo(f"best checkpoint: {result.best_checkpoint}")
    click.echo(f"metrics: {result.layout.final_metrics}; plots: {result.layout.plots}; "
               f"TensorBoard logs: {result.layout.logs}")


@segment.command("predict")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
              help="A checkpoint from `mambascope segment train`.")
@click.option("--input", "input_path", required=True, type=click.Path(exists=True, file_okay=False),
              help="A folder of BraTS case folders, or one case folder (labels optional).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: <case_id>.nii.gz per case, metrics.csv/json when labels exist.")
@click.option("--tta/--no-tta", default=True, show_default=True, help="Average over the 8 axis flips.")
@click.option("--overlap", default=None, type=click.FloatRange(0, 1, max_open=True),
              help="Sliding-window overlap (default: the training run's, 0.5).")
@click.option("--sw-batch-size", default=None, type=click.IntRange(min=1),
              help="Sliding windows per forward pass (default: the training run's).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
@config_option
def predict(**params: Any) -> None:
    """Segment cases: one BraTS label map per case, on the input's voxel grid and affine."""
    import torch
    from rich.progress import Progress

    from mambascope.data.brats import list_case_dirs, load_case
    from mambascope.errors import BatchError, MambascopeError
    from mambascope.eval.predict_seg import InferenceSettings, predict_cases
    from mambascope.train.seg import load_seg_checkpoint

    device = params["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, info = load_seg_checkpoint(params["checkpoint"], device=device)
    cases: list = []
    for folder in list_case_dirs(params["input_path"]):
        try:
            cases.append(load_case(folder))
        except MambascopeError as exc:
            cases.append(exc)
    settings = InferenceSettings(
        roi_size=info.patch_size, overlap=info.overlap if params["overlap"] is None else params["overlap"],
        sw_batch_size=info.sw_batch_size if params["sw_batch_size"] is None else params["sw_batch_size"],
        tta=params["tta"], device=device)
    out = Path(params["out"])
    out.mkdir(parents=True, exist_ok=True)
    save_run_config(out, params)
    with Progress(transient=True) as progress:
        task = progress.add_task("segmenting", total=len(cases))
        report = predict_cases(model, cases, out, settings,
                               progress=lambda case_id: progress.update(task, advance=1, description=case_id))
    written = sum(not r.skipped for r in report.results)
    kept = len(report.results) - written
    click.echo(f"{written} label map(s) written, {kept} kept from an earlier run, in {out}")
    if report.summary:
        s = report.summary
        click.echo(f"{s['n_cases']} labelled case(s): Dice TC/WT/ET {s['dice_TC']:.3f}/{s['dice_WT']:.3f}/"
                   f"{s['dice_ET']:.3f}, HD95 mean {s['hd95_mean']:.1f} mm -> {report.metrics_csv}")
    if report.failures:
        for case_id, message in report.failures.items():
            click.echo(f"failed: {case_id}: {message}", err=True)
        raise BatchError(f"{len(report.failures)} of {len(cases)} case(s) failed", path=out,
                         hint="fix the cases listed above and rerun; finished cases are kept")


COMMANDS = [segment]
