"""`mambascope features`: encode every patch of every slide into a features HDF5 file per slide."""

from __future__ import annotations

import click

from mambascope.cli.options import config_option, save_run_config


@click.command()
@config_option
@click.option("--coords", "coords", required=True, type=click.Path(file_okay=False),
              help="Output folder of `mambascope tile` (or its coords/ sub-folder).")
@click.option("--slides", required=True, type=click.Path(),
              help="Folder of slides, or CSV with slide_id, path (and optional mpp) columns.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for <slide_id>.h5 features files and features_status.csv.")
@click.option("--backbone", default="resnet50-trunc", show_default=True,
              help="resnet50-trunc | resnet50 | resnet34 | vit_b16 | timm:<model name>.")
@click.option("--weights", required=True,
              help="imagenet (timm download, needs a network) | PATH (local state dict / timm file) | "
                   "none (random; for tests).")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=0),
              help="DataLoader worker processes reading patches (one slide handle each).")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Autocast precision of the encoder.")
@click.option("--feature-dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16"]),
              help="dtype of the stored features.")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the encoder (worth it on GPUs).")
@click.option("--device", default="auto", show_default=True,
              help="auto | cpu | cuda | cuda:N (under torchrun each rank takes GPU LOCAL_RANK).")
@click.option("--shard", default=None,
              help="i/n: process every n-th slide from the i-th (default: from SLURM_ARRAY_TASK_ID/"
                   "SLURM_ARRAY_TASK_COUNT, else all).")
@click.option("--zero-fill-unreadable", is_flag=True,
              help="Zero the features of tiles that cannot be read (listed in `zero_filled`) "
                   "instead of failing the slide.")
@click.option("--slide-backend", default="auto", show_default=True,
              type=click.Choice(["auto", "openslide", "tiffslide", "image"]))
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random init for --weights none.")
def features(coords: str, slides: str, out_dir: str, backbone: str, weights: str, batch_size: int, workers: int,
             precision: str, feature_dtype: str, compile_model: bool, device: str, shard: str | None,
             zero_fill_unreadable: bool, slide_backend: str, seed: int) -> None:
    """Extract patch features from slides at the coordinates `mambascope tile` wrote.

    Writes <out>/<slide_id>.h5 (features, coords, provenance attrs). Reruns skip finished slides.
    Scale out with `torchrun --nproc-per-node G -m mambascope features ...` (one GPU per rank) and/or
    SLURM arrays (--shard or the array variables); every process takes a disjoint share of the slides.
    """
    import warnings
    from pathlib import Path

    from mambascope.errors import BatchError
    from mambascope.features.backbones import create_backbone
    from mambascope.features.jobs import resolve_coords_dir
    from mambascope.features.pipeline import ExtractionSettings, extract_features
    from mambascope.features.sharding import resolve_shard

    params = dict(click.get_current_context().params)
    settings = ExtractionSettings(batch_size=batch_size, workers=workers, precision=precision,
                                  compile=compile_model, device=device, zero_fill_unreadable=zero_fill_unreadable,
                                  feature_dtype=feature_dtype, slide_backend=slide_backend)
    process_shard, local_rank = resolve_shard(shard)
    resolve_coords_dir(coords)  # fail before loading a model or writing anything
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder = create_backbone(backbone, weights, seed=seed)
    for warning in caught:
        click.echo(f"warning: {warning.message}", err=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = save_run_config(out, {**params, "resolved_shard": f"{process_shard.index}/{process_shard.count}"},
                                  name=f"config{process_shard.tag}.yaml")
    report = extract_features(slides, coords, out, encoder, settings, shard=process_shard, local_rank=local_rank)
    counts = report.counts
    shard_text = "" if process_shard.count == 1 else f" (shard {process_shard.index}/{process_shard.count})"
    click.echo(f"features{shard_text}: {counts['done']} written, {counts['skipped']} already complete, "
               f"{counts['failed']} failed in {report.seconds:.1f} s; encoder {encoder.name} "
               f"({encoder.feature_dim}-d, weights {encoder.weights}) -> {out}/<slide_id>.h5")
    click.echo(f"status: {report.status_csv}; config: {config_path}")
    if report.failed:
        for outcome in report.failed:
            click.echo(f"  failed {outcome.slide_id}: {outcome.error}", err=True)
        raise BatchError(f"{len(report.failed)} of {len(report.outcomes)} slides failed", path=report.status_csv,
                         hint="see the error column; fix and rerun (finished slides are skipped)")


COMMANDS = [features]
