"""The choices a MIL run offers, kept free of heavy imports so the CLI can list them quickly."""

from __future__ import annotations

#: registered MIL aggregators (tests check this matches the model registry)
MIL_MODELS = ("abmil", "abmil-gated", "transmil", "mambamil", "mamba2d")
#: validation metric -> the direction that counts as better
MONITORS = {"val_loss": "min", "val_accuracy": "max", "val_balanced_accuracy": "max", "val_macro_f1": "max",
            "val_auc": "max"}
SAMPLERS = ("random", "weighted", "sequential")
SCHEDULERS = ("cosine", "step", "none")
LOSSES = ("ce", "focal")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
