"""Shared fixtures for the MIL tests: synthetic bags with planted instances, written as real feature files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mambascope.features.store import write_features
from mambascope.models import create_model

STEP = 256  # level-0 patch stride of the synthetic lattices
IN_DIM = 32
#: small widths so every model trains in seconds on a CPU
SMALL = {
    "abmil": {"hidden_dim": 32, "attn_dim": 16},
    "abmil-gated": {"hidden_dim": 32, "attn_dim": 16},
    "transmil": {"dim": 32, "heads": 4},
    "mambamil": {"dim": 16, "depth": 1, "d_state": 4, "attn_dim": 16, "reorder_rate": 4},
    "mamba2d": {"dim": 16, "depth": 1, "d_state": 4, "attn_dim": 16},
}


def small_model(name: str, num_classes: int = 3, seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    """A registered MIL model at the SMALL widths, seeded."""
    torch.manual_seed(seed)
    return create_model(name, in_dim=IN_DIM, num_classes=num_classes, dropout=dropout, **SMALL[name])


def lattice_coords(rng: np.random.Generator, n: int, step: int = STEP) -> np.ndarray:
    """`n` distinct cells of a roughly square lattice with a random origin (like tiled tissue)."""
    side = int(np.ceil(np.sqrt(n * 1.6))) + 1
    cells = rng.choice(side * side, size=n, replace=False)
    cells.sort()
    origin = rng.integers(0, 5000, size=2)
    return np.stack([origin[0] + (cells % side) * step, origin[1] + (cells // side) * step], axis=1).astype(np.int64)


@dataclass
class Bag:
    """One synthetic slide: features, lattice coords, label, and the indices of its planted patches."""

    features: np.ndarray
    coords: np.ndarray
    label: int
    planted: np.ndarray


def planted_bags(n_bags: int, seed: int, in_dim: int = 32, patches: tuple[int, int] = (16, 40),
                 n_planted: int = 2, strength: float = 8.0) -> list[Bag]:
    """Bags whose label is 1 exactly when a few patches are shifted along one fixed direction.

    The direction is the same for every seed, so bags from different seeds form one task.
    """
    direction = np.random.default_rng(123).standard_normal(in_dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n_bags):
        n = int(rng.integers(*patches))
        features = rng.standard_normal((n, in_dim)).astype(np.float32)
        label = i % 2
        planted = np.sort(rng.choice(n, size=n_planted, replace=False)) if label else np.zeros(0, dtype=np.int64)
        features[planted] += strength * direction
        bags.append(Bag(features, lattice_coords(rng, n), label, planted))
    return bags


def planted_dataset(root: Path, n_slides: int = 48, in_dim: int = 32, seed: int = 0,
                    splits: tuple[float, float] | None = (0.6, 0.2), case_ids: bool = False,
                    **kwargs) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """`planted_bags` written as feature files plus a labels CSV (classes `normal`, `tumor`).

    Returns (features dir, labels CSV, slide_id -> indices of the planted patches). The CSV has a split
    column (train/val/test by the fractions) unless `splits` is None.
    """
    features_dir = root / "features"
    rows, planted = [], {}
    for s, bag in enumerate(planted_bags(n_slides, seed, in_dim, **kwargs)):
        slide_id = f"slide_{s:03d}"
        write_features(features_dir / f"{slide_id}.h5", bag.features, bag.coords,
                       {"patch_size": 256, "patch_size_level0": STEP},
                       {"encoder": "synthetic", "weights": "none", "precision": "float32", "transform": "none"})
        if bag.label:
            planted[slide_id] = bag.planted
        row = {"slide_id": slide_id, "label": "tumor" if bag.label else "normal"}
        if case_ids:
            row["case_id"] = f"case_{s // 2:03d}"
        rows.append(row)
    frame = pd.DataFrame(rows)
    if splits:
        n_train, n_val = int(splits[0] * n_slides), int(splits[1] * n_slides)
        frame["split"] = ["train"] * n_train + ["val"] * n_val + ["test"] * (n_slides - n_train - n_val)
    labels = root / "labels.csv"
    frame.to_csv(labels, index=False)
    return features_dir, labels, planted


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread for the tiny tensors of these tests: on a busy 2-core machine, OpenMP
    thread hand-offs cost more than the arithmetic (10-100x slower steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
