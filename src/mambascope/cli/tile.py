"""`mambascope tile`: whole slides to tissue patch coordinates (and optionally patch pixels)."""

from __future__ import annotations

from pathlib import Path

import click

from mambascope.cli.options import config_option, save_run_config

DEFAULT_MAGNIFICATION = 20.0  # mambascope.slides.tiling.DEFAULT_MAGNIFICATION (not imported: keeps --help fast)


@click.command()
@config_option
@click.option("--slides", required=True, type=click.Path(exists=True, path_type=Path),
              help="Folder of slides (a sub-folder of DICOM files is one slide) or CSV with slide_id, path "
                   "[, mpp, label columns].")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--magnification", type=float, default=None,
              help=f"Target magnification, converted with each slide's own mpp/objective "
                   f"[default: {DEFAULT_MAGNIFICATION:g}].")
@click.option("--mpp", type=float, default=None, help="Target µm per pixel (instead of --magnification).")
@click.option("--patch-size", type=click.IntRange(min=8), default=256, show_default=True,
              help="Patch side in pixels at the target resolution.")
@click.option("--overlap", type=click.IntRange(min=0), default=0, show_default=True,
              help="Overlap of neighbouring patches in pixels at the target resolution.")
@click.option("--tissue-threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Keep patches whose area is at least this fraction tissue.")
@click.option("--mask-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Use <mask-dir>/<slide_id>_mask.png (non-zero = tissue, any size) instead of detection.")
@click.option("--save-patches", is_flag=True, help="Also write patch pixels to <out>/<id>/patches/<id>_patches.h5.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Slides tiled in parallel processes.")
@click.option("--backend", type=click.Choice(["auto", "openslide", "tiffslide", "image"]), default="auto",
              show_default=True, help="Slide reader (auto: OpenSlide, then tiffslide, then tifffile/OpenCV).")
@click.option("--allow-upsample", is_flag=True,
              help="Allow a target resolution finer than the scan (patches are upsampled).")
@click.option("--min-tissue-area", type=click.FloatRange(min=0), default=20_000.0, show_default=True,
              help="Drop tissue pieces smaller than this many µm².")
@click.option("--thumbnail-size", type=click.IntRange(min=64), default=1024, show_default=True,
              help="Longest side of the thumbnail PNG.")
@click.option("--overwrite", is_flag=True, help="Redo slides whose outputs are already complete.")
def tile(slides: Path, out: Path, magnification: float | None, mpp: float | None, patch_size: int, overlap: int,
         tissue_threshold: float, mask_dir: Path | None, save_patches: bool, workers: int, backend: str,
         allow_upsample: bool, min_tissue_area: float, thumbnail_size: int, overwrite: bool) -> None:
    """Find tissue, tile it at a physical resolution and write coordinates HDF5, thumbnails and GeoJSON.

    Outputs in OUT: coords/<id>.h5, thumbnails/<id>.png, contours/<id>.geojson (QuPath),
    processed_metadata.csv, config.yaml, and with --save-patches <id>/patches/<id>_patches.h5.
    A rerun skips complete outputs; a slide that fails is recorded and the others go on.
    """
    from dataclasses import replace

    from mambascope.errors import BatchError, ConfigError
    from mambascope.slides.batch import tile_slides
    from mambascope.slides.tiling import TilingConfig
    from mambascope.slides.tissue import TissueParams

    if magnification is not None and mpp is not None:
        raise ConfigError("give --magnification or --mpp, not both")
    if mpp is None and magnification is None:
        magnification = DEFAULT_MAGNIFICATION
    if overlap >= patch_size:
        raise ConfigError(f"--overlap ({overlap}) must be smaller than --patch-size ({patch_size})")
    params = dict(click.get_current_context().params, magnification=magnification)
    save_run_config(out, params)
    config = TilingConfig(patch_size=patch_size, magnification=magnification, mpp=mpp, overlap=overlap,
                          tissue_threshold=tissue_threshold, allow_upsample=allow_upsample, mask_dir=mask_dir,
                          save_patches=save_patches, backend=backend, thumbnail_size=thumbnail_size,
                          tissue=replace(TissueParams(), min_area_um2=min_tissue_area))
    report = tile_slides(slides, out, config, workers=workers, overwrite=overwrite, show_progress=True)
    patches = sum(r.num_patches or 0 for r in report.results if r.status != "failed")
    click.echo(f"{len(report.results)} slide(s): {report.count('tiled')} tiled, {report.count('skipped')} "
               f"already complete, {len(report.failed)} failed; {patches} patches.")
    click.echo(f"wrote {out}/coords/, thumbnails/, contours/"
               f"{', <id>/patches/' if save_patches else ''}, {report.metadata_path.name}, config.yaml")
    for result in report.failed:
        click.echo(f"  failed {result.slide_id}: {result.error}", err=True)
    if report.failed:
        raise BatchError(f"{len(report.failed)} of {len(report.results)} slide(s) failed",
                         path=report.metadata_path, hint="see the error column; fix and rerun (done slides are skipped)")


COMMANDS = [tile]
