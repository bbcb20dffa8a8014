"""Pure `nn.Module` models, registered by name: MIL aggregators, patch classifiers, 3D segmentation.

Importing this package registers every model, so `create_model(name, **kwargs)` sees them all.
"""

from mambascope.models import mil, patch, seg
from mambascope.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "mil", "patch", "register_model", "seg"]
