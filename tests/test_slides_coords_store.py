"""The coordinates HDF5 format: round trip, CLAM-style reading, broken files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mambascope.errors import DataError
from mambascope.slides.coords_store import STANDARD_ATTRS, coords_path, read_coords, write_coords


def test_round_trip_and_clam_style_reader(tmp_path):
    coords = np.array([[0, 0], [256, 0], [512, 768]], dtype=np.int32)
    path = write_coords(coords_path(tmp_path, "slide-1"), coords,
                        {"patch_size": 256, "patch_level": 0, "level0_mpp": 0.25, "reader": "openslide",
                         "downsample": [1.0, 1.0], "target_magnification": None})
    assert path == tmp_path / "coords" / "slide-1.h5"
    assert not path.with_name("slide-1.h5.tmp").exists()
    read, attrs = read_coords(path)
    assert read.dtype == np.int64
    np.testing.assert_array_equal(read, coords)
    assert attrs["patch_size"] == 256 and attrs["reader"] == "openslide" and attrs["downsample"] == [1.0, 1.0]
    assert set(STANDARD_ATTRS) <= set(attrs)
    assert attrs["target_magnification"] is None  # None is left out and reads back as None
    with h5py.File(path, "r") as handle:  # what CLAM's feature extraction does
        dset = handle["coords"]
        assert dset.attrs["patch_level"] == 0 and dset.attrs["patch_size"] == 256
        assert tuple(dset[1]) == (256, 0)


def test_reads_attributes_stored_on_the_file(tmp_path):
    path = tmp_path / "other_tool.h5"
    with h5py.File(path, "w") as handle:
        handle["coords"] = np.array([[1, 2]])
        handle.attrs["patch_size"] = 224
    coords, attrs = read_coords(path)
    assert coords.tolist() == [[1, 2]] and attrs["patch_size"] == 224


def test_broken_inputs(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_coords(tmp_path / "none.h5")
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(DataError, match="cannot read"):
        read_coords(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "nocoords.h5", "w") as handle:
        handle["features"] = np.zeros((2, 3))
    with pytest.raises(DataError, match="no `coords`"):
        read_coords(tmp_path / "nocoords.h5")
    with pytest.raises(DataError, match=r"\(N, 2\)"):
        write_coords(tmp_path / "bad.h5", np.zeros((3, 3), dtype=np.int64), {})
    with pytest.raises(DataError, match="integer"):
        write_coords(tmp_path / "bad.h5", np.zeros((3, 2)) + 0.5, {})
    assert not (tmp_path / "bad.h5").exists()
