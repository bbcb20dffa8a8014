"""`mambascope predict`: slide predictions, per-patch scores, heatmaps and galleries from checkpoints."""

from __future__ import annotations

from pathlib import Path

import click

from mambascope.cli.options import config_option, save_run_config

#: options that take several values after one flag (`--class-names A B C`)
VARIADIC_OPTIONS = ("--class-names",)


def spread_variadic(args: list[str], flags: tuple[str, ...] = VARIADIC_OPTIONS) -> list[str]:
    """Rewrite `--flag A B C` as `--flag A --flag B --flag C` so click's repeatable option takes it."""
    out: list[str] = []
    flag = None
    for arg in args:
        if arg in flags:
            flag = arg
            continue
        if flag is not None and not arg.startswith("-"):
            out += [flag, arg]
            continue
        flag = None
        out.append(arg)
    return out


class VariadicCommand(click.Command):
    """A command whose `VARIADIC_OPTIONS` accept several space-separated values."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, spread_variadic(list(args)))


@click.command(cls=VariadicCommand)
@config_option
@click.option("--checkpoint", "checkpoints", multiple=True, required=True, type=click.Path(exists=True),
              help="Checkpoint (.ckpt) or run folder (its best.ckpt files); repeat for an ensemble.")
@click.option("--features", type=click.Path(exists=True, file_okay=False),
              help="Folder of features files (<slide_id>.h5) to predict (MIL checkpoints).")
@click.option("--slides", type=click.Path(exists=True),
              help="Slide folder, or CSV with slide_id [path, label, split]: slide files for pictures, labels "
                   "for metrics; a CSV also selects which slides are predicted.")
@click.option("--images", type=click.Path(exists=True),
              help="Patch-model checkpoints: an image folder or patches HDF5 to classify.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--class-names", multiple=True,
              help="Names for the classes in the checkpoint's order (default: the training names): --class-names A B.")
@click.option("--heatmaps", is_flag=True, help="Also write per-patch scores, heatmap and gallery per slide.")
@click.option("--top-k", default=16, show_default=True, type=click.IntRange(min=0),
              help="Patches in each of the gallery's top and bottom rows (0: no gallery).")
@click.option("--split", default=None, help="Only slides of this split of the --slides CSV (e.g. test).")
@click.option("--thumbnail-size", default=2048, show_default=True, type=click.IntRange(min=64),
              help="Longest side of the heatmap, in pixels.")
@click.option("--cmap", default="jet", show_default=True, help="Matplotlib colour map of the heatmap.")
@click.option("--alpha", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Opacity of the heatmap over the thumbnail.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images per batch (patch-model checkpoints).")
def predict(**params) -> None:
    """Predict slides (MIL checkpoints, from --features) or images (patch checkpoints, from --images)."""
    from mambascope.errors import ConfigError
    from mambascope.eval.predict_mil import expand_checkpoints, predict_slides
    from mambascope.train.checkpoints import checkpoint_family

    out = Path(params["out"])
    checkpoints = expand_checkpoints(params["checkpoints"])
    families = {checkpoint_family(path) for path in checkpoints}
    if len(families) > 1:
        raise ConfigError(f"checkpoints of different families given ({', '.join(sorted(families))})",
                          hint="an ensemble needs checkpoints of one kind")
    family = families.pop()
    if family == "patch":
        if not params["images"]:
            raise ConfigError("a patch-model checkpoint needs --images (image folder or patches HDF5)")
        from mambascope.train.patch import predict_images

        save_run_config(out, params)
        written = predict_images(checkpoints, Path(params["images"]), out, params["batch_size"])
        click.echo(f"predictions of {len(checkpoints)} patch model(s) written to {written}")
        return
    if family != "mil":
        raise ConfigError(f"`mambascope predict` takes MIL or patch checkpoints, not {family}",
                          path=checkpoints[0], hint="for segmentation use `mambascope segment predict`")
    if not params["features"]:
        raise ConfigError("a MIL checkpoint needs --features (folder of features files)")
    save_run_config(out, params)
    report = predict_slides(
        checkpoints, params["features"], out, slides=params["slides"], class_names=params["class_names"] or None,
        heatmaps=params["heatmaps"], top_k=params["top_k"], split=params["split"],
        thumbnail_size=params["thumbnail_size"], cmap=params["cmap"], alpha=params["alpha"],
        device=params["device"], notify=lambda message: click.echo(message, err=True), progress=True)
    _summarise(report, heatmaps=params["heatmaps"])
    report.raise_for_failures()


def _summarise(report, *, heatmaps: bool) -> None:
    click.echo(f"predicted {len(report.predicted)} slide(s) -> {report.predictions_csv}")
    if report.metrics:
        m = report.metrics
        auc = "n/a" if m.get("auc") is None else f"{m['auc']:.3f}"
        click.echo(f"metrics on {m['n']} labelled slide(s): accuracy {m['accuracy']:.3f}, balanced accuracy "
                   f"{m['balanced_accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}, AUC {auc} -> "
                   f"{report.metrics_files.get('metrics')}")
    if heatmaps:
        drawn = sum(1 for o in report.predicted if any(p.parent.name == "heatmaps" for p in o.files))
        click.echo(f"scores in {report.out_dir / 'scores'}; pictures for {drawn} slide(s) in "
                   f"{report.out_dir / 'heatmaps'} and {report.out_dir / 'galleries'}")


COMMANDS = [predict]
