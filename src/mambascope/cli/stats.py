"""`mambascope stats ROOT`: per-dataset pixel mean and std, used to normalise microscopy training."""

from __future__ import annotations

import click


@click.command("stats")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--split", default="train", show_default=True,
              help="Sub-folder to measure (the whole ROOT when it has no such folder).")
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Where to write the JSON (default ROOT/stats.json).")
def stats(root: str, split: str, output: str | None) -> None:
    """Compute the per-channel mean and std of all images under ROOT/SPLIT (values in [0, 1])."""
    from rich.progress import Progress

    from mambascope.data.image_folder import dataset_stats, stats_images

    total = len(stats_images(root, split))
    with Progress(transient=True) as progress:
        task = progress.add_task("measuring images", total=total)
        result, path, reused = dataset_stats(root, split, output, lambda n: progress.advance(task, n))
    fmt = ",".join
    click.echo(f"mean {fmt(f'{v:.4f}' for v in result.mean)}  std {fmt(f'{v:.4f}' for v in result.std)}  "
               f"over {result.num_images} images")
    click.echo(f"{'unchanged images, kept' if reused else 'wrote'} {path}")


COMMANDS = [stats]
