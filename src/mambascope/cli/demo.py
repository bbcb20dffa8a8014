"""`mambascope demo`: the whole slide pipeline on a cohort cut from the bundled real slides."""

from __future__ import annotations

import click


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="demo_out", show_default=True,
              help="Folder for every output of the demo.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where features are extracted and models trained.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Training epochs per model (default: the demo's setting).")
@click.option("--slides-per-class", type=click.IntRange(min=3), default=None,
              help="Cohort size per class (default: the demo's setting).")
def demo(out_dir: str, device: str, epochs: int | None, slides_per_class: int | None) -> None:
    """Tile, extract features, train attention-MIL and 2DMamba-MIL, predict and draw heatmaps.

    Runs offline on slides cut from the bundled OpenSlide test images (H&E vs Ki67 IHC: a
    demonstration that the pipeline learns from real pixels, not a clinical benchmark).
    """
    import dataclasses

    from rich.console import Console
    from rich.table import Table

    from mambascope.cli.options import save_run_config
    from mambascope.demo.pipeline import DemoSettings, run_demo

    console = Console()
    settings = DemoSettings(device=device)
    if epochs is not None:
        settings = dataclasses.replace(settings, epochs=epochs)
    if slides_per_class is not None:
        settings = dataclasses.replace(settings, max_per_class=slides_per_class)
    save_run_config(out_dir, dataclasses.asdict(settings))
    result = run_demo(out_dir, settings, stage=lambda name: console.rule(f"[bold]{name}"))

    table = Table(title="held-out test slides")
    for column in ("model", "slides", "accuracy", "balanced accuracy", "macro F1", "AUC"):
        table.add_column(column)
    for model, metrics in result.metrics.items():
        table.add_row(model, str(metrics.get("n", "")),
                      *(f"{metrics.get(key, float('nan')):.3f}"
                        for key in ("accuracy", "balanced_accuracy", "macro_f1", "auc")))
    console.print(table)
    console.print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.stage_seconds.items()))
    console.print(f"cohort: {result.labels_csv}")
    for model, path in result.predictions.items():
        console.print(f"{model}: predictions {path}; heatmaps {path.parent / 'heatmaps'} "
                      f"({len(result.heatmaps[model])} PNG)")


COMMANDS = [demo]
