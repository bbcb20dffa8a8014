"""Patch HDF5 layout + manifest cache, ImageFolder splits and dataset statistics, on real patches."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pandas as pd
import pytest

from mambascope.cli.main import main
from mambascope.data.image_folder import ImageListDataset, dataset_stats, load_image_folder, load_split
from mambascope.data.patch_h5 import (
    PatchH5Dataset,
    check_split_classes,
    load_labelled_patches,
    patch_file_path,
    split_samples,
)
from mambascope.data.patch_transforms import TransformSpec, build_transform
from mambascope.errors import DataError
from patch_helpers import one_thread, real_patch_samples, write_h5_layout, write_image_folder

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def test_h5_layout_reads_every_patch_with_its_sample_label(tmp_path):
    csv = write_h5_layout(tmp_path)
    patches = load_labelled_patches(tmp_path, csv, "tissue_type", cache_dir=tmp_path / "cache")
    samples = real_patch_samples()
    assert patches.class_names == ["HE", "IHC"]
    assert len(patches.files) == 16 and patches.patch_size == (32, 32)
    dataset = PatchH5Dataset(patches.files, patches.labels)
    assert len(dataset) == 16 * 12
    expected = {sample_id: (label, data) for sample_id, label, data in samples}
    for index in (0, 13, 100, len(dataset) - 1):
        file_no, patch_no = dataset.locate(index)
        sample_id = patches.files[file_no].sample_id
        image, label = dataset[index]
        assert patches.class_names[label] == expected[sample_id][0]
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected[sample_id][1][patch_no])
    counts = np.bincount(dataset.patch_labels())
    assert counts.tolist() == [96, 96]


def test_manifest_cache_is_used_on_second_start_and_invalidated_by_a_change(tmp_path, monkeypatch):
    csv = write_h5_layout(tmp_path)
    cache = tmp_path / "manifest_cache"
    first = load_labelled_patches(tmp_path, csv, "tissue_type", cache_dir=cache)
    assert not first.from_cache and len(list(cache.glob("manifest_*.json"))) == 1

    import mambascope.data.patch_h5 as module

    def refuse(*_args, **_kwargs):
        raise AssertionError("a cached manifest must not reopen the HDF5 files")

    monkeypatch.setattr(module, "inspect_patch_file", refuse)
    second = load_labelled_patches(tmp_path, csv, "tissue_type", cache_dir=cache)
    assert second.from_cache and second.files == first.files
    monkeypatch.undo()

    changed = patch_file_path(tmp_path, first.files[0].sample_id)
    with h5py.File(changed, "a") as handle:  # one more patch: size and mtime change
        data = handle["data"][:]
        del handle["data"]
        handle.create_dataset("data", data=np.concatenate([data, data[:1]]))
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third = load_labelled_patches(tmp_path, csv, "tissue_type", cache_dir=cache)
    assert not third.from_cache and third.files[0].num_patches == first.files[0].num_patches + 1


def test_ids_without_files_are_skipped_with_a_warning_and_an_error_if_none_remain(tmp_path):
    csv = write_h5_layout(tmp_path)
    table = pd.read_csv(csv)
    extra = pd.concat([table, pd.DataFrame({"id": ["ghost_a", "ghost_b"], "tissue_type": ["HE", "IHC"]})])
    extra.to_csv(tmp_path / "more.csv", index=False)
    with pytest.warns(UserWarning, match="ghost_a, ghost_b"):
        patches = load_labelled_patches(tmp_path, tmp_path / "more.csv", "tissue_type")
    assert len(patches.files) == 16
    pd.DataFrame({"id": ["ghost"], "tissue_type": ["HE"]}).to_csv(tmp_path / "none.csv", index=False)
    with pytest.raises(DataError, match="none of the 1 ids"):
        load_labelled_patches(tmp_path, tmp_path / "none.csv", "tissue_type")
    with pytest.raises(DataError, match="no column 'diagnosis'"):
        load_labelled_patches(tmp_path, csv, "diagnosis")


def test_h5_without_data_and_mixed_sizes_are_errors(tmp_path):
    csv = write_h5_layout(tmp_path)
    first = pd.read_csv(csv)["id"][0]
    path = patch_file_path(tmp_path, first)
    with h5py.File(path, "r+") as handle:
        handle.move("data", "imgs")
    with pytest.raises(DataError, match="no dataset 'data'") as info:
        load_labelled_patches(tmp_path, csv, "tissue_type")
    assert info.value.path == str(path)
    with h5py.File(path, "r+") as handle:
        del handle["imgs"]
        handle.create_dataset("data", data=np.zeros((3, 48, 48, 3), np.uint8))
    with pytest.raises(DataError, match="mixed sizes"):
        load_labelled_patches(tmp_path, csv, "tissue_type")


def test_split_is_by_sample_stratified_and_reproducible():
    labels = {f"s{i:02d}": ("a" if i < 10 else "b") for i in range(16)}
    splits = split_samples(labels, val_fraction=0.2, test_fraction=0.2, seed=3)
    assert splits == split_samples(labels, 0.2, 0.2, seed=3)
    assert splits != split_samples(labels, 0.2, 0.2, seed=4)
    all_ids = splits["train"] + splits["val"] + splits["test"]
    assert sorted(all_ids) == sorted(labels)  # disjoint and complete
    for name, n_a, n_b in (("val", 2, 1), ("test", 2, 1)):
        assert sum(labels[s] == "a" for s in splits[name]) == n_a
        assert sum(labels[s] == "b" for s in splits[name]) == n_b
    with pytest.raises(DataError, match="no samples in the training split"):
        check_split_classes({"train": [0, 0], "val": [1]}, ["a", "b"])
    with pytest.warns(UserWarning, match="no samples in the val split"):
        check_split_classes({"train": [0, 1], "val": [1]}, ["a", "b"])


def test_image_folder_classes_come_from_train_and_bad_trees_are_reported(tmp_path):
    root = write_image_folder(tmp_path / "folder")
    splits = load_image_folder(root)
    assert splits["train"].class_names == ["HE", "IHC"]
    assert [len(splits[s].paths) for s in ("train", "val", "test")] == [96, 48, 48]
    assert np.bincount(splits["val"].labels).tolist() == [24, 24]
    spec = TransformSpec(24, recipe="microscopy")
    image, label = ImageListDataset(splits["train"].paths, splits["train"].labels, build_transform(spec, True))[0]
    assert image.shape == (3, 24, 24) and image.dtype.is_floating_point and label == 0

    for path in (root / "val" / "IHC").iterdir():
        path.unlink()
    with pytest.warns(UserWarning, match="IHC have no images in the val split"):
        val = load_split(root, "val", ["HE", "IHC"])
    assert set(val.labels) == {0}
    (root / "test" / "Tumour").mkdir()
    moved = sorted((root / "test" / "HE").iterdir())[0]
    moved.rename(root / "test" / "Tumour" / moved.name)
    with pytest.raises(DataError, match="Tumour are not among the classes"):
        load_split(root, "test", ["HE", "IHC"])


def test_stats_match_numpy_and_are_reused_when_unchanged(tmp_path):
    root = write_image_folder(tmp_path / "folder")
    stats, path, reused = dataset_stats(root)
    assert not reused and path == root / "stats.json"
    pixels = np.concatenate([data for sid, _, data in real_patch_samples() if sid.endswith(("q0", "q1"))])
    pixels = pixels.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(stats.mean, pixels.mean(0), atol=1e-9)
    np.testing.assert_allclose(stats.std, pixels.std(0), atol=1e-9)
    assert stats.num_images == 96
    again, _, reused = dataset_stats(root)
    assert reused and again == stats

    assert main(["stats", str(root), "--output", str(tmp_path / "s.json")]) == 0
    written = json.loads((tmp_path / "s.json").read_text())
    np.testing.assert_allclose(written["mean"], stats.mean)
    assert main(["stats", str(tmp_path / "empty_dir_missing")]) != 0


def test_h5_dataset_reads_in_worker_processes_after_the_parent_opened_files(tmp_path):
    import torch

    csv = write_h5_layout(tmp_path, per_sample=2)
    patches = load_labelled_patches(tmp_path, csv, "tissue_type")
    dataset = PatchH5Dataset(patches.files, patches.labels)
    first = dataset[0][0]  # the parent now holds an open HDF5 handle; workers must not inherit it
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2)
    images = torch.cat([batch for batch, _ in loader])
    assert images.shape == (32, 3, 32, 32)
    assert torch.equal(images[0], first)
