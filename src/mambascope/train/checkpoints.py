"""Reading Lightning checkpoints safely (`weights_only=True`) and telling which family wrote them."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from mambascope.errors import CheckpointError

FAMILIES = ("mil", "patch", "seg")


def load_checkpoint_dict(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """The checkpoint's dict (tensors and plain values only; nothing is unpickled as code)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint not found", path=path, hint="check --checkpoint")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint cannot be loaded safely ({first[:160]})", path=path,
                              hint="pass a checkpoint written by mambascope (checkpoints/best.ckpt)") from None
    if not isinstance(data, dict) or "state_dict" not in data:
        raise CheckpointError("file is not a Lightning checkpoint (no state_dict)", path=path,
                              hint="pass a checkpoint written by mambascope (checkpoints/best.ckpt)")
    return data


def checkpoint_hparams(data: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The saved hyper-parameters, which must name the family (`mil`, `patch` or `seg`)."""
    hparams = data.get("hyper_parameters")
    if not isinstance(hparams, dict) or hparams.get("family") not in FAMILIES:
        raise CheckpointError("checkpoint has no mambascope model family in its hyper-parameters", path=path,
                              hint="pass a checkpoint written by `mambascope train`")
    return hparams


def checkpoint_family(path: str | Path) -> str:
    """`mil`, `patch` or `seg`: which trainer wrote this checkpoint."""
    return checkpoint_hparams(load_checkpoint_dict(path), path)["family"]
