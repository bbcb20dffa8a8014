"""The features HDF5 format: round trip, completeness, and reading CLAM / TRIDENT files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from mambascope.errors import DataError
from mambascope.features.store import (
    feature_dim,
    is_complete,
    list_feature_files,
    open_feature_writer,
    read_feature_attrs,
    read_features,
    write_features,
)

RNG = np.random.default_rng(0)


def _bag(n: int = 7, d: int = 12, dtype=np.float32):
    return RNG.standard_normal((n, d)).astype(dtype), RNG.integers(0, 5000, size=(n, 2)).astype(np.int64)


def test_round_trip_keeps_values_attrs_and_coords_attrs(tmp_path):
    features, coords = _bag(dtype=np.float16)
    coords_attrs = {"patch_size": 256, "patch_size_level0": 512, "target_mpp": None, "reader": "openslide",
                    "tiling_config": '{"patch_size": 256}'}
    attrs = {"encoder": "resnet50-trunc", "weights": "none", "precision": "bf16",
             "transform": {"resize": 224, "mean": [0.485, 0.456, 0.406]}}
    path = write_features(tmp_path / "TCGA-AB.1234.h5", features, coords, coords_attrs, attrs)
    bag = read_features(path)
    assert bag.slide_id == "TCGA-AB.1234"
    assert bag.features.dtype == np.float16 and np.array_equal(bag.features, features)
    assert np.array_equal(bag.coords, coords) and bag.coords.dtype == np.int64
    assert bag.attrs["encoder"] == "resnet50-trunc" and bag.attrs["feature_dim"] == 12
    assert bag.attrs["transform"] == {"resize": 224, "mean": [0.485, 0.456, 0.406]}
    assert bag.coords_attrs["patch_size_level0"] == 512
    assert bag.coords_attrs["tiling_config"] == '{"patch_size": 256}'  # other tools' strings stay strings
    assert "target_mpp" not in bag.coords_attrs
    assert len(bag) == 7 and bag.feature_dim == 12
    assert feature_dim(path) == 12
    assert is_complete(path, 7) and not is_complete(path, 8)
    assert read_feature_attrs(path)["precision"] == "bf16"
    assert not (tmp_path / "TCGA-AB.1234.h5.tmp").exists()


def test_streaming_writer_accepts_blocks_in_any_order_and_records_zero_filled(tmp_path):
    features, coords = _bag(n=10, d=4)
    path = tmp_path / "s.h5"
    with open_feature_writer(path, coords=coords, feature_dim=4, coords_attrs={}, attrs={"encoder": "x"}) as writer:
        writer.write(6, features[6:])
        writer.write(0, features[:6])
        writer.mark_zero_filled([3, 1])
    bag = read_features(path)
    assert np.array_equal(bag.features, features)
    assert bag.attrs["zero_filled"] == [1, 3] and bag.attrs["num_zero_filled"] == 2


def test_writer_that_misses_rows_or_fails_leaves_no_file(tmp_path):
    features, coords = _bag(n=10, d=4)
    path = tmp_path / "s.h5"
    with pytest.raises(RuntimeError, match="never written"), \
            open_feature_writer(path, coords=coords, feature_dim=4, coords_attrs={}, attrs={}) as writer:
        writer.write(0, features[:5])
    assert not path.exists() and not path.with_name("s.h5.tmp").exists()
    with pytest.raises(ValueError), open_feature_writer(path, coords=coords, feature_dim=4, coords_attrs={},
                                                        attrs={}) as writer:
        writer.write(0, features)
        raise ValueError("crash mid-slide")
    assert not path.exists()


def test_reads_clam_h5_trident_h5_and_clam_pt(tmp_path):
    features, coords = _bag(n=5, d=8)
    clam = tmp_path / "clam_slide.h5"
    with h5py.File(clam, "w") as handle:  # CLAM: bare datasets, coords attrs patch_level / patch_size
        handle["features"] = features
        handle["coords"] = coords.astype(np.int32)
        handle["coords"].attrs["patch_level"] = 0
        handle["coords"].attrs["patch_size"] = 256
    bag = read_features(clam)
    assert np.array_equal(bag.features, features) and bag.coords.dtype == np.int64
    assert bag.coords_attrs == {"patch_level": 0, "patch_size": 256} and bag.slide_id == "clam_slide"

    trident = tmp_path / "trident_slide.h5"
    with h5py.File(trident, "w") as handle:  # TRIDENT: attrs on both datasets, features may be (1, N, D)
        handle.create_dataset("features", data=features[None])
        handle["features"].attrs["encoder"] = "conch_v15"
        handle.create_dataset("coords", data=coords)
        handle["coords"].attrs["patch_size_level0"] = 512
        handle["coords"].attrs["target_magnification"] = 20
    bag = read_features(trident)
    assert bag.features.shape == (5, 8) and bag.attrs["encoder"] == "conch_v15"
    assert bag.coords_attrs["patch_size_level0"] == 512
    assert feature_dim(trident) == 8

    pt = tmp_path / "clam_pt.pt"
    torch.save(torch.from_numpy(features), pt)
    bag = read_features(pt)
    assert bag.coords is None and np.array_equal(bag.features, features) and bag.slide_id == "clam_pt"
    assert feature_dim(pt) == 8
    assert [p.name for p in list_feature_files(tmp_path)] == ["clam_pt.pt", "clam_slide.h5", "trident_slide.h5"]


def test_bad_files_raise_data_error_naming_the_file(tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(DataError, match="not found") as info:
        read_features(missing)
    assert str(missing) in str(info.value)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file")
    with pytest.raises(DataError, match="not a readable HDF5"):
        read_features(junk)
    assert not is_complete(junk)
    coords_only = tmp_path / "coords_only.h5"
    with h5py.File(coords_only, "w") as handle:
        handle["coords"] = np.zeros((3, 2), dtype=np.int64)
    with pytest.raises(DataError, match="no `features` dataset"):
        read_features(coords_only)
    mismatched = tmp_path / "mismatch.h5"
    with h5py.File(mismatched, "w") as handle:
        handle["features"] = np.zeros((4, 3), dtype=np.float32)
        handle["coords"] = np.zeros((5, 2), dtype=np.int64)
    with pytest.raises(DataError, match="does not match 4 feature rows"):
        read_features(mismatched)
    bad_pt = tmp_path / "bad.pt"
    torch.save({"weights": [1, 2]}, bad_pt)
    with pytest.raises(DataError, match="not a tensor"):
        read_features(bad_pt)
