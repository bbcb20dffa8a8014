"""BraTS case discovery, checks, MONAI transforms and splits, on the bundled real MRI case."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

from mambascope.data.brats import (
    MODALITIES,
    brats_transforms,
    check_case,
    check_label_values,
    find_cases,
    labels_to_regions,
    load_case,
    load_splits,
    regions_to_labels,
    save_splits,
    split_cases,
)
from mambascope.errors import ConfigError, DataError
from mambascope.sample_data import sample_path
from seg_helpers import subsampled, write_case, write_dataset


def test_cases_found_under_2021_and_2023_names(tmp_path):
    write_case(tmp_path / "a", "BraTS2021_00001", stride=6)
    write_case(tmp_path / "b", "BraTS-GLI-00002-000", stride=6, convention="2023")
    old = load_case(tmp_path / "a" / "BraTS2021_00001", require_label=True)
    new = load_case(tmp_path / "b" / "BraTS-GLI-00002-000", require_label=True)
    assert (old.convention, old.et_label) == ("2021", 4)
    assert (new.convention, new.et_label) == ("2023", 3)
    assert [p.name for p in old.images] == [f"BraTS2021_00001_{m}.nii.gz" for m in MODALITIES]
    assert [p.name for p in new.images] == [f"BraTS-GLI-00002-000-{m}.nii.gz" for m in ("t1n", "t1c", "t2w", "t2f")]
    assert new.label.name == "BraTS-GLI-00002-000-seg.nii.gz"
    # a folder of cases and a single case folder both work
    assert [c.case_id for c in find_cases(tmp_path / "a")] == ["BraTS2021_00001"]
    assert [c.case_id for c in find_cases(tmp_path / "a" / "BraTS2021_00001")] == ["BraTS2021_00001"]
    assert check_label_values(old) == (0, 1, 2, 4)
    assert check_label_values(new) == (0, 1, 2, 3)


def test_geometry_of_the_real_case(tmp_path):
    folder = write_case(tmp_path, "case", stride=4)
    geometry = check_case(load_case(folder), patch_size=(32, 32, 32))
    assert geometry.shape == (60, 60, 39)
    assert geometry.spacing == (4.0, 4.0, 4.0)
    np.testing.assert_allclose(geometry.affine, nib.load(str(folder / "case_t1.nii.gz")).affine)


def test_missing_modality_names_the_case(tmp_path):
    folder = write_case(tmp_path, "BraTS2021_00007", stride=6)
    (folder / "BraTS2021_00007_t1ce.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case BraTS2021_00007: missing modality t1ce") as info:
        load_case(folder)
    assert "BraTS2021_00007_t1ce.nii.gz" in info.value.hint


def test_missing_label_for_training_names_the_case(tmp_path):
    folder = write_case(tmp_path, "BraTS2021_00008", stride=6, with_label=False)
    assert load_case(folder).label is None
    with pytest.raises(DataError, match="case BraTS2021_00008: label file missing"):
        load_case(folder, require_label=True)


def test_volumes_of_different_shape_or_affine(tmp_path):
    folder = write_case(tmp_path, "BraTS2021_00009", stride=6)
    nib.save(subsampled("flair", 5), str(folder / "BraTS2021_00009_flair.nii.gz"))
    with pytest.raises(DataError, match=r"case BraTS2021_00009: volume shape \(48, 48, 31\) differs"):
        check_case(load_case(folder))
    image = subsampled("flair", 6)
    moved = image.affine.copy()
    moved[:3, 3] += 10.0
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), moved), str(folder / "BraTS2021_00009_flair.nii.gz"))
    with pytest.raises(DataError, match="case BraTS2021_00009: affine differs"):
        check_case(load_case(folder))


def test_label_values_checked_against_the_convention(tmp_path):
    # 2021 labels (ET = 4) saved under 2023 names: caught, and the hint says so
    folder = tmp_path / "BraTS-GLI-00010-000"
    write_case(tmp_path, "BraTS-GLI-00010-000", stride=6, convention="2023")
    nib.save(subsampled("seg", 6), str(folder / "BraTS-GLI-00010-000-seg.nii.gz"))
    case = load_case(folder)
    with pytest.raises(DataError, match=r"case BraTS-GLI-00010-000: unexpected label values \[4\]") as info:
        check_case(case)
    assert "BraTS 2021" in info.value.hint


def test_patch_larger_than_the_volume(tmp_path):
    case = load_case(write_case(tmp_path, "BraTS2021_00011", stride=4))
    with pytest.raises(DataError, match=r"case BraTS2021_00011: patch size \(64, 64, 64\) is larger"):
        check_case(case, patch_size=(64, 64, 64))


def test_mixed_names_in_one_case(tmp_path):
    folder = write_case(tmp_path, "x", stride=6)
    shutil.copy(folder / "x_t1.nii.gz", folder / "x-t1n.nii.gz")
    with pytest.raises(DataError, match="case x: mixes BraTS 2021 and 2023"):
        load_case(folder)


@pytest.mark.parametrize("convention", ["2021", "2023"])
def test_regions_round_trip_on_the_real_label_map(convention):
    labels = np.asanyarray(nib.load(str(sample_path("TCGA-FG-6692/seg_fusion_simple.nii.gz"))).dataobj)
    et = 4 if convention == "2021" else 3
    labels = np.where(labels == 4, et, labels).astype(np.uint8)
    regions = labels_to_regions(labels, et)
    assert regions.shape == (3, *labels.shape)
    tc, wt, et_mask = regions
    assert tc.sum() == np.isin(labels, [1, et]).sum() == 2477 + 6840
    assert wt.sum() == (labels > 0).sum() == 30179
    assert et_mask.sum() == 6840
    np.testing.assert_array_equal(regions_to_labels(regions, et), labels)


def test_transforms_on_the_real_case(tmp_path):
    case = find_cases(write_dataset(tmp_path, n_cases=1), require_label=True)[0]
    raw = np.asanyarray(nib.load(str(case.label)).dataobj)

    val = brats_transforms("val", et_label=4)(case.as_record())
    image, label = np.asarray(val["image"]), np.asarray(val["label"])
    assert image.shape[0] == 4 and label.shape == (3, *image.shape[1:])
    # cropped to the brain, but no tumour voxel lost
    assert image.shape[1:] < (60, 60, 39) and (np.abs(image).reshape(4, -1).max(1) > 0).all()
    np.testing.assert_array_equal(label.reshape(3, -1).sum(1),
                                  [np.isin(raw, [1, 4]).sum(), (raw > 0).sum(), (raw == 4).sum()])
    for channel in image:  # z-scored over the brain
        brain = channel[channel != 0]
        assert abs(brain.mean()) < 1e-3 and abs(brain.std() - 1) < 1e-2

    from monai.utils import set_determinism

    set_determinism(seed=0)
    train = brats_transforms("train", et_label=4, patch_size=(32, 32, 32), num_samples=3)(case.as_record())
    assert len(train) == 3
    for sample in train:
        assert tuple(sample["image"].shape) == (4, 32, 32, 32)
        tc, wt, et = np.asarray(sample["label"]).astype(bool)
        assert set(np.unique(np.asarray(sample["label"]))) <= {0.0, 1.0}
        assert not (et & ~tc).any() and not (tc & ~wt).any()  # nested regions
    assert sum(np.asarray(s["label"])[1].any() for s in train) >= 1  # tumour-biased crops hit the tumour

    infer = brats_transforms("infer")(case.as_record(with_label=False))
    assert "label" not in infer and infer["image"].shape == val["image"].shape


def test_splits_are_seeded_disjoint_and_saved(tmp_path):
    ids = [f"case{i:02d}" for i in range(10)]
    splits = split_cases(ids, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert splits == split_cases(list(reversed(ids)), val_fraction=0.2, test_fraction=0.1, seed=3)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (7, 2, 1)
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == ids
    assert splits != split_cases(ids, val_fraction=0.2, test_fraction=0.1, seed=4)
    path = save_splits(tmp_path / "splits.json", splits)
    assert load_splits(path, ids) == splits
    with pytest.raises(DataError, match="names cases not in the data folder"):
        load_splits(path, ids[1:])
    with pytest.raises(ConfigError, match="at least 2 cases"):
        split_cases(["only"])
