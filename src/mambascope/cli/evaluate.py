"""`mambascope evaluate`: metrics of trained checkpoints (MIL on features, patch models via their trainer)."""

from __future__ import annotations

from pathlib import Path

import click

from mambascope.errors import ConfigError


def _default_out(checkpoints: tuple[Path, ...]) -> Path:
    """A single checkpoint in RUN/checkpoints/ reports into RUN; otherwise --out is needed."""
    if len(checkpoints) == 1 and checkpoints[0].parent.name == "checkpoints":
        return checkpoints[0].parent.parent
    raise ConfigError("--out is required when evaluating several checkpoints or one outside a run directory",
                      hint="pass --out DIR")


@click.command()
@click.option("--checkpoint", "checkpoints", type=click.Path(dir_okay=False, path_type=Path), multiple=True,
              required=True, help="Checkpoint(s); several MIL checkpoints are ensembled (mean probability).")
@click.option("--features", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="MIL: folder of <slide_id>.h5 feature files.")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="MIL: labels CSV (slide_id, label, optional split).")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Patch models: the data root they were trained on (ImageFolder tree or patch HDF5 folder).")
@click.option("--split", default=None,
              help="Split to evaluate (MIL default: test if the CSV has one, else val, else all rows; patch: test).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: the checkpoint's run directory).")
@click.option("--skip-missing", is_flag=True, help="MIL: leave out CSV slides without a features file.")
def evaluate(checkpoints: tuple[Path, ...], features: Path | None, labels: Path | None, data_root: Path | None,
             split: str | None, out: Path | None, skip_missing: bool) -> None:
    """Accuracy, balanced accuracy, macro F1, per-class accuracy, one-vs-rest AUC, confusion matrix, ROC.

    Writes OUT/metrics/final_metrics.json, OUT/metrics/predictions.csv and OUT/plots/*.png.
    """
    from mambascope.cli.train_mil import print_metrics_summary
    from mambascope.train.checkpoints import checkpoint_family

    out = out or _default_out(checkpoints)
    family = checkpoint_family(checkpoints[0])
    if family == "patch":
        if data_root is None or len(checkpoints) != 1:
            raise click.UsageError("a patch checkpoint is evaluated alone and needs --data-root")
        from mambascope.train.patch import evaluate_checkpoint

        split = split or "test"
        print_metrics_summary(evaluate_checkpoint(checkpoints[0], data_root, out, split=split), f"patch model on {split}")
        click.echo(f"wrote {split}_metrics.json, {split}_predictions.csv and plots to {out}")
        return
    if family != "mil":
        raise ConfigError(f"`evaluate` handles MIL and patch checkpoints, not {family!r}",
                          hint="evaluate segmentation with `mambascope segment predict`")
    if features is None or labels is None:
        raise click.UsageError("a MIL checkpoint needs --features and --labels")
    from mambascope.train.mil import evaluate_mil

    metrics = evaluate_mil(checkpoints, features, labels, out, split=split, skip_missing=skip_missing)
    print_metrics_summary(metrics, f"{metrics['model']} on {metrics['split']} ({len(checkpoints)} checkpoint(s))")
    click.echo(f"wrote {out / 'metrics' / 'final_metrics.json'}, {out / 'metrics' / 'predictions.csv'} "
               f"and plots in {out / 'plots'}")


COMMANDS = [evaluate]
