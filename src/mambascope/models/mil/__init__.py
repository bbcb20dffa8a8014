"""Slide-level multiple-instance learning aggregators (importing registers them).

Every model is built as `create_model(name, in_dim=..., num_classes=..., **kw)` and called on one bag:
`model(features (N, in_dim), coords (N, 2) | None) -> MILOutput(logits, scores)`. Coords may live on
any device; keep them on the CPU when the features are on a GPU (`mamba2d` builds its grid on the host).
"""

from mambascope.models.mil import abmil, mamba2d, mambamil, transmil
from mambascope.models.mil.output import MILOutput

__all__ = ["MILOutput", "abmil", "mamba2d", "mambamil", "transmil"]
