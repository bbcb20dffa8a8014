"""The demo: tile → features → train attention-MIL and 2DMamba-MIL → predict with heatmaps.

Every stage calls the same library function as its command (`tile_slides`, `extract_features`,
`train_mil`, `predict_slides`), on a cohort cut from the bundled real slides (`cohort.py`), so the demo
is also a worked example of running the pipeline from Python.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mambascope.demo.cohort import COHORT_TISSUE, build_demo_cohort
from mambascope.errors import BatchError

DEMO_MODELS = ("abmil-gated", "mamba2d")


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; the defaults finish in a few minutes on 2 CPU cores."""

    device: str = "cpu"
    patch_size: int = 64
    magnification: float = 20.0
    backbone: str = "timm:resnet18"
    batch_size: int = 64
    epochs: int = 15
    max_per_class: int = 12
    models: tuple[str, ...] = DEMO_MODELS
    seed: int = 0


@dataclass
class DemoResult:
    """Where the demo wrote things and how each model did on the held-out slides."""

    out_dir: Path
    labels_csv: Path
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    predictions: dict[str, Path] = field(default_factory=dict)
    heatmaps: dict[str, list[Path]] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _fail_if_any(failed: list, stage: str, where: Path) -> None:
    if failed:
        raise BatchError(f"demo stage {stage!r}: {len(failed)} slide(s) failed", path=where,
                         hint="see the status/metadata CSV there; run `mambascope doctor`")


def run_demo(out_dir: str | Path, settings: DemoSettings = DemoSettings(),
             stage: Callable[[str], None] = lambda name: None) -> DemoResult:
    """Run the whole slide pipeline under `out_dir`; `stage(name)` is called as each stage starts."""
    import torch

    from mambascope.eval.predict_mil import predict_slides
    from mambascope.features.backbones import create_backbone
    from mambascope.features.pipeline import ExtractionSettings, extract_features
    from mambascope.slides.batch import tile_slides
    from mambascope.slides.tiling import TilingConfig
    from mambascope.train.mil import MILTrainConfig, train_mil

    torch.manual_seed(settings.seed)
    out_dir = Path(out_dir)
    clock: dict[str, float] = {}

    def timed(name: str, work: Callable[[], Any]) -> Any:
        stage(name)
        start = time.perf_counter()
        value = work()
        clock[name] = time.perf_counter() - start
        return value

    labels_csv = timed("cohort", lambda: build_demo_cohort(out_dir / "cohort", max_per_class=settings.max_per_class,
                                                           seed=settings.seed))
    tiles_dir = out_dir / "tiles"
    tiling = timed("tile", lambda: tile_slides(
        labels_csv, tiles_dir, TilingConfig(patch_size=settings.patch_size, magnification=settings.magnification,
                                            tissue=COHORT_TISSUE)))
    _fail_if_any(tiling.failed, "tile", tiling.metadata_path)

    features_dir = out_dir / "features"
    with warnings.catch_warnings():  # random weights are the demo's choice (it never downloads); README says so
        warnings.filterwarnings("ignore", message=".*random weights.*")
        backbone = create_backbone(settings.backbone, "none", seed=settings.seed)
    extraction = timed("features", lambda: extract_features(
        labels_csv, tiles_dir, features_dir, backbone,
        ExtractionSettings(batch_size=settings.batch_size, workers=0, device=settings.device), show_progress=True))
    _fail_if_any(extraction.failed, "features", extraction.status_csv)

    result = DemoResult(out_dir=out_dir, labels_csv=labels_csv)
    for model in settings.models:
        run_dir = out_dir / "runs" / model
        config = MILTrainConfig(features=features_dir, labels=labels_csv, model=model, out=run_dir,
                                epochs=settings.epochs, seed=settings.seed, lr=1e-3, patience=settings.epochs,
                                monitor="val_loss", accelerator="gpu" if settings.device.startswith("cuda") else "cpu",
                                devices="1", resume=False)
        timed(f"train {model}", lambda config=config: train_mil(config))
        report = timed(f"predict {model}", lambda run_dir=run_dir: predict_slides(
            [run_dir / "checkpoints" / "best.ckpt"], features_dir, out_dir / "predictions" / run_dir.name,
            slides=labels_csv, heatmaps=True, top_k=8, split="test", device=settings.device))
        result.metrics[model] = report.metrics or {}
        result.predictions[model] = report.predictions_csv
        result.heatmaps[model] = sorted((report.out_dir / "heatmaps").glob("*.png"))
    result.stage_seconds = clock
    return result
