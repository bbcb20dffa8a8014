"""Patch feature extraction: backbone registry, streaming pipeline, features HDF5 store.

The store (numpy + h5py only) is re-exported here; the backbone registry and pipeline need torch and
are imported from their modules (`mambascope.features.backbones`, `mambascope.features.pipeline`).
"""

from mambascope.features.store import (
    FeatureBag,
    feature_dim,
    features_path,
    is_complete,
    list_feature_files,
    open_feature_writer,
    read_features,
    write_features,
)

__all__ = [
    "FeatureBag",
    "feature_dim",
    "features_path",
    "is_complete",
    "list_feature_files",
    "open_feature_writer",
    "read_features",
    "write_features",
]
