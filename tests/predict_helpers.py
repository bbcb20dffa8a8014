"""Shared pieces of the predict tests: the real SVS, a patch grid on it, features files, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mambascope.sample_data import sample_path

SVS = "CMU-1-Small-Region.svs"
SVS_SIZE = (2220, 2967)


def svs_path() -> Path:
    return sample_path(SVS)


def grid_coords(dimensions: tuple[int, int], size0: int, step: int | None = None) -> np.ndarray:
    """Top-left level-0 corners of a regular grid of whole patches, row by row."""
    step = step or size0
    xs = np.arange(0, dimensions[0] - size0 + 1, step)
    ys = np.arange(0, dimensions[1] - size0 + 1, step)
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)


def coords_attrs(dimensions: tuple[int, int], size0: int, size: int) -> dict:
    """The coordinates attrs `mambascope tile` records, for a grid on a slide of these dimensions."""
    return {"patch_size": size, "patch_size_level0": size0, "patch_level": 0, "level0_width": dimensions[0],
            "level0_height": dimensions[1], "overlap": 0, "level0_mpp": 0.499, "target_mpp": 0.499 * size0 / size}


def write_bags(features_dir: Path, slide_ids: list[str], in_dim: int, *, size0: int = 256, size: int = 256,
               seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One features file per slide id, on the SVS's patch grid, with seeded random features."""
    from mambascope.features.store import write_features

    rng = np.random.default_rng(seed)
    coords = grid_coords(SVS_SIZE, size0)
    bags = {}
    for slide_id in slide_ids:
        features = rng.normal(size=(len(coords), in_dim)).astype(np.float32)
        write_features(features_dir / f"{slide_id}.h5", features, coords, coords_attrs(SVS_SIZE, size0, size),
                       {"encoder": "test", "weights": "random", "precision": "fp32", "transform": "none"},
                       slide_id=slide_id)
        bags[slide_id] = (features, coords)
    return bags


TINY_KWARGS = {
    "abmil": {"hidden_dim": 16, "attn_dim": 8},
    "abmil-gated": {"hidden_dim": 16, "attn_dim": 8},
    "transmil": {"dim": 16, "heads": 2},
    "mambamil": {"dim": 16, "depth": 1, "d_state": 4, "attn_dim": 8},
    "mamba2d": {"dim": 16, "depth": 1, "d_state": 4, "attn_dim": 8},
}


def make_checkpoint(path: Path, model_name: str, in_dim: int, class_names: list[str], seed: int = 0) -> Path:
    """A checkpoint as `mambascope train mil` writes it (state_dict + hyper-parameters), untrained weights."""
    import torch

    from mambascope.train.mil_module import MILModule

    torch.manual_seed(seed)
    module = MILModule(model_name, in_dim, class_names, TINY_KWARGS[model_name])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 0}, path)
    return path


def model_output(checkpoint: Path, features: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(softmax probabilities, scores) of one checkpoint's model on one bag, straight from Python."""
    import torch

    from mambascope.train.mil import load_mil_checkpoint

    model, _ = load_mil_checkpoint(checkpoint)
    with torch.no_grad():
        out = model(torch.from_numpy(features), torch.from_numpy(coords))
    return torch.softmax(out.logits, -1).numpy(), out.scores.numpy()
