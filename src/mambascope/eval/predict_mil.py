"""Slide-level predictions from MIL checkpoints: probabilities, per-patch scores and their pictures.

`predict_slides` is what `mambascope predict` runs. It reads features files (never slides) to
predict, so predictions and score files are written even where the slide files are absent; the
slides are opened only to draw the heatmap and gallery. Several checkpoints form an ensemble whose
class probabilities and per-patch scores are the mean over its members (the scores are attention
weights summing to 1 over a bag for every MIL model, so their mean is again such a weighting).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from mambascope.atomic import atomic_path
from mambascope.errors import BatchError, CheckpointError, ConfigError, DataError, MambascopeError
from mambascope.eval.heatmaps import (
    add_colour_bar,
    colour_lut,
    png_text,
    read_tiles,
    render_gallery,
    render_heatmap,
    save_png,
    top_bottom_indices,
)

log = logging.getLogger(__name__)

Notify = Callable[[str], None]


# --------------------------------------------------------------------------------------------- models


@dataclass
class Ensemble:
    """One or more MIL models that agree on input width and classes, ready for inference."""

    models: list[torch.nn.Module]
    checkpoints: list[Path]
    model_names: list[str]
    class_names: list[str]
    trained_class_names: list[str]
    in_dim: int
    fingerprint: str
    device: torch.device

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def expand_checkpoints(paths: Sequence[str | Path]) -> list[Path]:
    """Checkpoint files from files or run folders (a folder contributes every `best.ckpt` below it,
    e.g. one per cross-validation fold)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            best = sorted(path.rglob("best.ckpt"))
            if not best:
                raise CheckpointError("no best.ckpt found in this folder", path=path,
                                      hint="pass a checkpoint file or a run directory of `mambascope train`")
            found.extend(best)
        elif path.is_file():
            found.append(path)
        else:
            raise CheckpointError("checkpoint not found", path=path, hint="check --checkpoint")
    if not found:
        raise ConfigError("no checkpoint given", hint="pass --checkpoint CKPT at least once")
    return found


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` means the GPU when there is one."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}", hint="use auto, cpu, cuda or cuda:N") from None


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_ensemble(checkpoints: Sequence[str | Path], *, class_names: Sequence[str] | None = None,
                  device: str | torch.device = "auto") -> Ensemble:
    """Load MIL checkpoints (files or run folders) as one ensemble, checking they are compatible.

    `class_names` renames the classes for output; their number must match the checkpoints'.
    """
    from mambascope.train.mil import load_mil_checkpoint

    paths = expand_checkpoints(checkpoints)
    target = resolve_device(device)
    loaded = [load_mil_checkpoint(path) for path in paths]
    first = loaded[0][1]
    for _, info in loaded[1:]:
        if info.class_names != first.class_names or info.in_dim != first.in_dim:
            raise CheckpointError(
                f"checkpoint has {len(info.class_names)} classes ({', '.join(info.class_names)}) and "
                f"{info.in_dim}-d input, but {first.path} has {len(first.class_names)} "
                f"({', '.join(first.class_names)}) and {first.in_dim}-d", path=info.path,
                hint="an ensemble needs checkpoints trained on the same classes and features")
    trained_names = [str(c) for c in first.class_names]
    if class_names:
        class_names = [str(c) for c in class_names]
        if len(class_names) != len(trained_names):
            raise ConfigError(
                f"{len(class_names)} class names given ({', '.join(class_names)}) but the checkpoint "
                f"predicts {len(trained_names)} classes ({', '.join(trained_names)})", path=paths[0],
                hint=f"give exactly {len(trained_names)} names to --class-names, in the training order")
        if len(set(class_names)) != len(class_names):
            raise ConfigError("class names must be distinct", hint="give each class its own name")
    digests = "".join(_file_digest(path) for path in paths)
    return Ensemble(models=[model.to(target).eval() for model, _ in loaded], checkpoints=paths,
                    model_names=[info.model_name for _, info in loaded],
                    class_names=list(class_names) if class_names else trained_names,
                    trained_class_names=trained_names, in_dim=int(first.in_dim),
                    fingerprint=hashlib.sha256(digests.encode()).hexdigest()[:16], device=target)


@dataclass
class BagPrediction:
    """The ensemble's answer for one bag."""

    probs: np.ndarray  # (C,) mean class probabilities
    scores: np.ndarray  # (N,) mean per-patch scores
    scores_per_model: np.ndarray  # (M, N)


@torch.inference_mode()
def predict_bag(ensemble: Ensemble, features: np.ndarray, coords: np.ndarray | None) -> BagPrediction:
    """Class probabilities (softmax, averaged over members) and per-patch scores of one bag."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=ensemble.device)
    c = None if coords is None else torch.as_tensor(np.asarray(coords), dtype=torch.int64,
                                                     device=ensemble.device)
    probs, scores = [], []
    for model in ensemble.models:
        out = model(x, c)
        probs.append(torch.softmax(out.logits.float().reshape(-1), dim=0).cpu().numpy())
        scores.append(out.scores.float().reshape(-1).cpu().numpy())
    per_model = np.stack(scores).astype(np.float32)
    return BagPrediction(probs=np.mean(probs, axis=0), scores=per_model.mean(axis=0), scores_per_model=per_model)


# --------------------------------------------------------------------------------------------- inputs


@dataclass
class SlideRecord:
    """What is known about one slide to predict: its features file, and its slide file and label
    when a slide list gives them."""

    slide_id: str
    features: Path | None
    slide_path: Path | None = None
    mpp_override: float | None = None
    label: Any = None
    split: str | None = None


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == ""


def _slide_table(slides: str | Path) -> list[SlideRecord]:
    """Slide ids, slide files, labels and splits from a folder of slides or a CSV.

    A CSV needs `slide_id`; `path` (slide files), `label` and `split` are optional, so the labels
    CSV used for training also works (then there are predictions and metrics but no pictures).
    """
    from mambascope.slides.reader import list_slides

    slides = Path(slides)
    if not (slides.is_file() and slides.suffix.lower() == ".csv"):
        return [SlideRecord(slide_id=e.slide_id, features=None, slide_path=Path(e.path), mpp_override=e.mpp_override)
                for e in list_slides(slides)]
    import pandas as pd

    try:
        table = pd.read_csv(slides, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the slide CSV ({exc})", path=slides, hint="pass a CSV with slide_id") from None
    if "slide_id" not in table.columns:
        raise DataError("slide CSV has no slide_id column", path=slides,
                        hint="add a slide_id column (and path, label, split as needed)")
    entries = {e.slide_id: e for e in list_slides(slides)} if "path" in table.columns else {}
    records = []
    for row in table.to_dict("records"):
        slide_id = row["slide_id"].strip()
        entry = entries.get(slide_id)
        records.append(SlideRecord(
            slide_id=slide_id, features=None, slide_path=Path(entry.path) if entry else None,
            mpp_override=entry.mpp_override if entry else None,
            label=None if _is_missing(row.get("label")) else row["label"].strip(),
            split=None if _is_missing(row.get("split")) else row["split"].strip()))
    return records


def gather_slides(features_dir: str | Path, slides: str | Path | None = None,
                  split: str | None = None) -> list[SlideRecord]:
    """Pair features files with slide files and labels.

    A CSV decides which slides are predicted (a listed slide without features is recorded as
    failed), restricted to one `split` when given; a folder of slides, or none, leaves that to the
    features folder.
    """
    from mambascope.features.store import list_feature_files, slide_id_from_path

    files = {}
    for path in list_feature_files(features_dir):
        files.setdefault(slide_id_from_path(path), path)  # .h5 sorts before .pt: prefer it
    is_csv = slides is not None and Path(slides).is_file() and Path(slides).suffix.lower() == ".csv"
    if split is not None and not is_csv:
        raise ConfigError("--split needs --slides to be a CSV with a split column")
    if slides is None:
        return [SlideRecord(slide_id=sid, features=path) for sid, path in sorted(files.items())]
    listed = _slide_table(slides)
    if not is_csv:
        by_id = {r.slide_id: r for r in listed}
        return [SlideRecord(slide_id=sid, features=path,
                            slide_path=by_id[sid].slide_path if sid in by_id else None,
                            mpp_override=by_id[sid].mpp_override if sid in by_id else None)
                for sid, path in sorted(files.items())]
    if split is not None:
        present = sorted({r.split for r in listed if r.split})
        listed = [r for r in listed if r.split == split]
        if not listed:
            raise DataError(f"no slide of split {split!r} in the slide CSV", path=slides,
                            hint=f"splits present: {', '.join(present) or 'none (no split column)'}")
    for record in listed:
        record.features = files.get(record.slide_id)
    return listed


def label_index(label: Any, class_names: Sequence[str], trained_names: Sequence[str] | None = None) -> int:
    """Class index of a CSV label given as a class name (output or training name) or an integer."""
    text = str(label).strip()
    for names in (class_names, trained_names or ()):
        if text in names:
            return list(names).index(text)
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if number.is_integer() and 0 <= int(number) < len(class_names):
        return int(number)
    raise DataError(f"label {label!r} is not one of the classes {', '.join(class_names)}",
                    hint="labels must be class names or integers 0..C-1 in the training order")


# --------------------------------------------------------------------------------------------- outputs


@dataclass
class OutputPaths:
    """Where `predict_slides` writes, under one output folder."""

    root: Path

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.csv"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def scores_npy(self, slide_id: str) -> Path:
        return self.root / "scores" / f"{slide_id}.npy"

    def scores_h5(self, slide_id: str) -> Path:
        return self.root / "scores" / f"{slide_id}.h5"

    def heatmap(self, slide_id: str) -> Path:
        return self.root / "heatmaps" / f"{slide_id}.png"

    def gallery(self, slide_id: str) -> Path:
        return self.root / "galleries" / f"{slide_id}.png"


def write_scores(paths: OutputPaths, slide_id: str, prediction: BagPrediction, coords: np.ndarray | None,
                 coords_attrs: dict[str, Any], attrs: dict[str, Any]) -> list[Path]:
    """Per-patch scores as `.npy`, and as HDF5 with the coords (and their attrs) beside them."""
    npy = paths.scores_npy(slide_id)
    with atomic_path(npy) as tmp, tmp.open("wb") as handle:
        np.save(handle, prediction.scores.astype(np.float32))
    h5 = paths.scores_h5(slide_id)
    with atomic_path(h5) as tmp, h5py.File(tmp, "w") as handle:
        handle.create_dataset("scores", data=prediction.scores.astype(np.float32))
        handle.create_dataset("scores_per_model", data=prediction.scores_per_model)
        handle.create_dataset("probabilities", data=prediction.probs.astype(np.float32))
        if coords is not None:
            coords_ds = handle.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
            for key, value in coords_attrs.items():
                if value is not None:
                    coords_ds.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
        for key, value in attrs.items():
            handle.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
    return [npy, h5]


def read_scores(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(scores (N,), coords (N, 2) or None, attrs) of a scores HDF5 written by `predict_slides`."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as handle:
            scores = handle["scores"][()]
            coords = handle["coords"][()] if "coords" in handle else None
            attrs = {k: _attr_value(v) for k, v in handle.attrs.items()}
    except (OSError, KeyError):
        raise DataError("scores file is missing or damaged", path=path, hint="rerun `mambascope predict`") from None
    return scores, coords, attrs


def _attr_value(value: Any) -> Any:
    """HDF5 attribute back to a Python value (lists were stored as JSON text)."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] == "[":
        return json.loads(value)
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------------------------- pictures


@dataclass(frozen=True)
class PictureOptions:
    """How heatmaps and galleries are drawn; part of what decides whether a kept picture is current."""

    top_k: int = 16
    thumbnail_size: int = 2048
    cmap: str = "jet"
    alpha: float = 0.5

    def key(self, ensemble: Ensemble, slide_path: Path) -> str:
        """Identity of a picture: the checkpoints, the slide file and these options."""
        return json.dumps({"ensemble": ensemble.fingerprint, "slide": str(slide_path), **asdict(self)},
                          sort_keys=True)


PICTURE_KEY = "mambascope-picture"


def patch_geometry(coords_attrs: dict[str, Any], level_downsamples: Sequence[float]) -> tuple[int, int]:
    """(patch_size_level0, patch_size) of the features' patches: ours and TRIDENT's record both;
    CLAM's record `patch_size` at `patch_level`."""
    size = coords_attrs.get("patch_size")
    size0 = coords_attrs.get("patch_size_level0")
    if size0 is None and size is not None and coords_attrs.get("patch_level") is not None:
        level = int(coords_attrs["patch_level"])
        if 0 <= level < len(level_downsamples):
            size0 = round(float(size) * float(level_downsamples[level]))
    if size0 is None:
        raise DataError("the features' coords record no patch size (patch_size_level0)",
                        hint="extract features from coordinates written by `mambascope tile`")
    return int(size0), int(size if size is not None else size0)


def draw_pictures(slide_path: Path, scores: np.ndarray, coords: np.ndarray, coords_attrs: dict[str, Any], *,
                  heatmap_path: Path, gallery_path: Path, options: PictureOptions = PictureOptions(),
                  mpp_override: float | None = None, text: dict[str, str] | None = None) -> list[Path]:
    """Heatmap (with colour bar) and top/bottom-k gallery of one slide, read at the model's resolution.

    Refuses (DataError) a slide file whose size or fingerprint differs from the one the features
    were computed on, since the picture would be drawn in the wrong place. `text` is stored in the
    PNGs. Returns the files written.
    """
    from mambascope.slides.reader import open_slide

    with open_slide(slide_path, mpp_override=mpp_override) as slide:
        _check_same_slide(slide, coords_attrs, slide_path)
        size0, size = patch_geometry(coords_attrs, slide.level_downsamples)
        thumbnail = slide.thumbnail(options.thumbnail_size)
        heat = render_heatmap(scores, coords, size0, thumbnail, slide.dimensions, cmap=options.cmap,
                              alpha=options.alpha)
        written = [save_png(heatmap_path, add_colour_bar(heat, cmap=options.cmap), text)]
        if options.top_k > 0:
            top, bottom = top_bottom_indices(scores, options.top_k)
            gallery = render_gallery(
                read_tiles(slide, coords, scores, top, size0, size),
                read_tiles(slide, coords, scores, bottom, size0, size),
                title=f"{slide.slide_id}: patches by score ({size}px for {size0}px at level 0)")
            written.append(save_png(gallery_path, gallery, text))
    return written


def _check_same_slide(slide, coords_attrs: dict[str, Any], slide_path: Path) -> None:
    width, height = coords_attrs.get("level0_width"), coords_attrs.get("level0_height")
    if width is not None and height is not None and (int(width), int(height)) != tuple(slide.dimensions):
        raise DataError(f"slide is {slide.dimensions[0]}x{slide.dimensions[1]} but the features were computed "
                        f"on a {int(width)}x{int(height)} slide", path=slide_path,
                        hint="point --slides at the slide files the features came from")
    recorded = coords_attrs.get("slide_fingerprint")
    if recorded and str(recorded) != slide.fingerprint():
        raise DataError("slide file differs from the one the features were computed on (fingerprint)",
                        path=slide_path, hint="point --slides at the slide files the features came from")


# --------------------------------------------------------------------------------------------- driver


@dataclass
class SlideOutcome:
    """What happened to one slide."""

    slide_id: str
    num_patches: int = 0
    probs: np.ndarray | None = None
    label: Any = None
    files: list[Path] = field(default_factory=list)
    error: str | None = None
    pictures_note: str | None = None


@dataclass
class PredictionReport:
    """Everything `predict_slides` did: per-slide outcomes and the files it wrote."""

    out_dir: Path
    class_names: list[str]
    outcomes: list[SlideOutcome]
    predictions_csv: Path
    metrics: dict[str, Any] | None = None
    metrics_files: dict[str, Path] = field(default_factory=dict)

    @property
    def failures(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.error]

    @property
    def predicted(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.probs is not None]

    def raise_for_failures(self) -> None:
        """BatchError naming every slide that failed (after the others finished)."""
        if self.failures:
            detail = "; ".join(f"{o.slide_id}: {o.error}" for o in self.failures)
            raise BatchError(f"{len(self.failures)} of {len(self.outcomes)} slides failed ({detail})",
                             path=self.predictions_csv, hint="fix those inputs and rerun; the others are written")


def predict_slides(checkpoints: Sequence[str | Path], features_dir: str | Path, out_dir: str | Path, *,
                   slides: str | Path | None = None, class_names: Sequence[str] | None = None,
                   heatmaps: bool = False, top_k: int = 16, split: str | None = None,
                   thumbnail_size: int = 2048, cmap: str = "jet", alpha: float = 0.5,
                   device: str | torch.device = "auto", notify: Notify | None = None,
                   progress: bool = False) -> PredictionReport:
    """Predict every slide with the checkpoint ensemble and write `out_dir/predictions.csv`.

    With `heatmaps`, also per slide: `scores/<id>.npy`, `scores/<id>.h5` (scores + coords),
    `heatmaps/<id>.png` and `galleries/<id>.png` (pictures need the slide file, from `slides`).
    When `slides` is a CSV with a `label` column, `metrics.json` and `plots/` hold the evaluation.
    A slide that fails is recorded in the report and the rest go on.
    """
    say = notify or log.warning
    ensemble = load_ensemble(checkpoints, class_names=class_names, device=device)
    colour_lut(cmap)  # an unknown colour map fails before any work
    paths = OutputPaths(Path(out_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    records = gather_slides(features_dir, slides, split)
    if not records:
        raise DataError("no features files to predict", path=features_dir,
                        hint="run `mambascope features` or check --features and --slides")
    if heatmaps and slides is None:
        say("no --slides given: writing per-patch scores but no heatmap or gallery pictures")
    pictures = PictureOptions(top_k=top_k, thumbnail_size=thumbnail_size, cmap=cmap, alpha=alpha) if heatmaps else None
    outcomes = []
    for record in _track(records, progress, ensemble):
        outcome = SlideOutcome(slide_id=record.slide_id, label=record.label)
        try:
            _predict_one(record, ensemble, paths, outcome, pictures, say, slides_given=slides is not None)
        except MambascopeError as exc:
            outcome.error = exc.one_line()
            say(f"{record.slide_id}: {outcome.error}")
        outcomes.append(outcome)
    report = PredictionReport(out_dir=paths.root, class_names=ensemble.class_names, outcomes=outcomes,
                              predictions_csv=paths.predictions)
    _write_predictions(report, paths)
    _evaluate(report, paths, ensemble.trained_class_names)
    return report


def _track(records: list[SlideRecord], progress: bool, ensemble: Ensemble):
    if not progress:
        return records
    from rich.progress import track

    return track(records, description=f"predicting ({len(ensemble.models)} model(s))", transient=True)


def _predict_one(record: SlideRecord, ensemble: Ensemble, paths: OutputPaths, outcome: SlideOutcome,
                 pictures: PictureOptions | None, say: Notify, *, slides_given: bool) -> None:
    """Predict one slide into `outcome`; with `pictures`, also write its scores and draw it."""
    from mambascope.features.store import read_features

    if record.features is None:
        raise DataError("no features file for this slide", hint="run `mambascope features` for it or drop it")
    if record.label is not None:  # a label that is no class fails this slide before any work
        label_index(record.label, ensemble.class_names, ensemble.trained_class_names)
    bag = read_features(record.features)
    outcome.num_patches = len(bag)
    if bag.feature_dim != ensemble.in_dim:
        raise DataError(f"features have dimension {bag.feature_dim} but the checkpoint expects {ensemble.in_dim}",
                        path=record.features, hint="use features from the encoder the model was trained with")
    prediction = predict_bag(ensemble, bag.features, bag.coords)
    outcome.probs = prediction.probs
    if pictures is None:
        return
    attrs = {"slide_id": record.slide_id, "class_names": ensemble.class_names,
             "checkpoints": [str(p) for p in ensemble.checkpoints], "models": ensemble.model_names,
             "ensemble_fingerprint": ensemble.fingerprint}
    outcome.files += write_scores(paths, record.slide_id, prediction, bag.coords, bag.coords_attrs, attrs)
    skip = _pictures_skip_reason(record, bag.coords, slides_given)
    if skip:
        outcome.pictures_note = skip
        if slides_given:
            say(f"{record.slide_id}: pictures skipped: {skip}")
        return
    targets = [paths.heatmap(record.slide_id)] + ([paths.gallery(record.slide_id)] if pictures.top_k else [])
    key = pictures.key(ensemble, record.slide_path)
    if all((png_text(path) or {}).get(PICTURE_KEY) == key for path in targets):
        outcome.pictures_note = "pictures up to date (kept)"
        outcome.files += targets
        return
    try:
        outcome.files += draw_pictures(record.slide_path, prediction.scores, bag.coords, bag.coords_attrs,
                                       heatmap_path=targets[0], gallery_path=paths.gallery(record.slide_id),
                                       options=pictures, mpp_override=record.mpp_override,
                                       text={PICTURE_KEY: key})
    except MambascopeError as exc:
        outcome.pictures_note = exc.one_line()
        say(f"{record.slide_id}: pictures skipped: {outcome.pictures_note}")


def _pictures_skip_reason(record: SlideRecord, coords: np.ndarray | None, slides_given: bool) -> str | None:
    if coords is None:
        return "the features file has no patch coordinates"
    if record.slide_path is None:
        return "no slide file for this slide in --slides" if slides_given else "no --slides given"
    if not record.slide_path.exists():
        return f"slide file not found: {record.slide_path}"
    return None


def _write_predictions(report: PredictionReport, paths: OutputPaths) -> None:
    import pandas as pd

    has_labels = any(o.label is not None for o in report.outcomes)
    rows = []
    for outcome in report.predicted:
        row: dict[str, Any] = {"slide_id": outcome.slide_id, "num_patches": outcome.num_patches,
                               "predicted": report.class_names[int(np.argmax(outcome.probs))]}
        row.update({f"prob_{name}": float(p) for name, p in zip(report.class_names, outcome.probs, strict=True)})
        if has_labels:
            row["label"] = outcome.label
        rows.append(row)
    columns = ["slide_id", "num_patches", "predicted", *(f"prob_{n}" for n in report.class_names)]
    table = pd.DataFrame(rows, columns=[*columns, "label"] if has_labels else columns)
    with atomic_path(paths.predictions) as tmp:
        table.to_csv(tmp, index=False)


def _evaluate(report: PredictionReport, paths: OutputPaths, trained_names: list[str]) -> None:
    from mambascope.eval.classification import classification_metrics, save_classification_report

    labelled = [o for o in report.predicted if o.label is not None]
    if not labelled:
        return
    y = np.array([label_index(o.label, report.class_names, trained_names) for o in labelled])
    probs = np.stack([o.probs for o in labelled])
    report.metrics = classification_metrics(y, probs, report.class_names)
    report.metrics_files = save_classification_report(report.metrics, y, probs, report.class_names,
                                                      paths.plots, paths.metrics)
