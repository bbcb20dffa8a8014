"""Atomic writes leave no partial file; bundled sample data are present and intact."""

from __future__ import annotations

import pytest

from mambascope.atomic import atomic_path, write_text_atomic
from mambascope.sample_data import SAMPLE_FILES, check_samples, sample_path


def test_atomic_path_renames_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("done")
        assert not target.exists()
        assert tmp.name == "out.txt.tmp"
    assert target.read_text() == "done"
    assert not (tmp_path / "sub" / "out.txt.tmp").exists()


def test_atomic_path_leaves_old_file_on_error(tmp_path):
    target = write_text_atomic(tmp_path / "out.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert not (tmp_path / "out.txt.tmp").exists()


def test_bundled_samples_match_checksums():
    status = check_samples()
    assert set(status) == set(SAMPLE_FILES)
    assert all(status.values()), status
    assert sample_path("CMU-1-Small-Region.svs").stat().st_size == 1938955


def test_unknown_sample_name():
    with pytest.raises(KeyError, match="no bundled sample"):
        sample_path("nope.svs")
