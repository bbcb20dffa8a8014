"""Inference: label maps land on the input's voxel grid with its affine; flips; batch failures."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch

from mambascope.data.brats import load_case
from mambascope.errors import DataError
from mambascope.eval.predict_seg import (
    InferenceSettings,
    flip_sets,
    predict_cases,
    sliding_window_probabilities,
)
from seg_helpers import write_case


class ChannelThreshold(torch.nn.Module):
    """A stand-in model whose answer is known: region k = (z-scored modality k > 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 50.0 * x[:, :3]


def expected_labels(case, et_label: int) -> np.ndarray:
    """What ChannelThreshold must give, computed on the raw input volumes without any MONAI step."""
    regions = []
    for path in case.images[:3]:
        raw = np.asanyarray(nib.load(str(path)).dataobj).astype(np.float64)
        regions.append(raw > raw[raw != 0].mean())  # z-score over non-zero voxels > 0
    tc, wt, et = regions
    labels = np.zeros(tc.shape, dtype=np.uint8)
    labels[wt], labels[tc], labels[et] = 2, 1, et_label
    return labels


def test_label_maps_on_the_input_grid_with_its_affine(tmp_path):
    """RAS reorientation, brain crop and sliding window are all undone: voxel for voxel, same affine."""
    old = load_case(write_case(tmp_path / "in", "BraTS2021_00001", stride=4))
    new = load_case(write_case(tmp_path / "in", "BraTS-GLI-00002-000", stride=4, offset=1, convention="2023"))
    settings = InferenceSettings(roi_size=(32, 32, 32), overlap=0.5, sw_batch_size=4)
    report = predict_cases(ChannelThreshold(), [old, new], tmp_path / "out", settings)
    assert not report.failures
    for case, et_label in ((old, 4), (new, 3)):
        written = nib.load(str(tmp_path / "out" / f"{case.case_id}.nii.gz"))
        source = nib.load(str(case.images[0]))
        assert written.shape == source.shape
        np.testing.assert_array_equal(written.affine, source.affine)
        assert written.get_data_dtype() == np.uint8
        labels = np.asanyarray(written.dataobj)
        assert set(np.unique(labels)) == {0, 1, 2, et_label}
        np.testing.assert_array_equal(labels, expected_labels(case, et_label))
    # both cases have labels, so they are scored, and the table is written
    assert report.summary["n_cases"] == 2
    assert (tmp_path / "out" / "metrics.csv").read_text().count("\n") == 3
    assert 0 <= report.summary["dice_WT"] < 1


def test_rerun_keeps_complete_outputs_and_redoes_broken_ones(tmp_path):
    case = load_case(write_case(tmp_path / "in", "BraTS2021_00003", stride=6))
    settings = InferenceSettings(roi_size=(32, 32, 32), sw_batch_size=4)
    predict_cases(ChannelThreshold(), [case], tmp_path / "out", settings)
    out = tmp_path / "out" / "BraTS2021_00003.nii.gz"
    first = out.read_bytes()
    assert predict_cases(ChannelThreshold(), [case], tmp_path / "out", settings).results[0].skipped
    out.write_bytes(first[:100])  # truncated
    report = predict_cases(ChannelThreshold(), [case], tmp_path / "out", settings)
    assert not report.results[0].skipped and out.read_bytes() == first


def test_a_failing_case_is_recorded_and_the_rest_finish(tmp_path):
    good = load_case(write_case(tmp_path / "in", "good", stride=6, with_label=False))
    bad_folder = write_case(tmp_path / "in", "bad", stride=6, with_label=False)
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.int16), np.eye(4)), str(bad_folder / "bad_t2.nii.gz"))
    missing = DataError("case gone: missing modality flair", path=tmp_path / "in" / "gone")
    settings = InferenceSettings(roi_size=(32, 32, 32), sw_batch_size=4)
    report = predict_cases(ChannelThreshold(), [good, load_case(bad_folder), missing], tmp_path / "out", settings)
    assert [r.case_id for r in report.results] == ["good"]
    assert set(report.failures) == {"bad", "gone"}
    assert "case bad: volume shape (10, 10, 10)" in report.failures["bad"]
    assert report.summary is None and not (tmp_path / "out" / "metrics.csv").exists()  # no labels, no metrics


def test_flip_tta_averages_mirrored_predictions():
    assert len(flip_sets(True)) == 8 and flip_sets(False) == [()]
    torch.manual_seed(0)
    image = torch.randn(1, 4, 20, 18, 16)
    conv = torch.nn.Conv3d(4, 3, 3, padding=1)
    whole = (20, 18, 16)  # one window, so the sliding window adds nothing to compare against
    with torch.no_grad():
        plain = sliding_window_probabilities(conv, image, InferenceSettings(whole))
        tta = sliding_window_probabilities(conv, image, InferenceSettings(whole, tta=True))
        manual = sum(torch.sigmoid(conv(image.flip(a)).flip(a) if a else conv(image)) for a in flip_sets(True)) / 8
    assert not torch.allclose(plain, tta, atol=1e-3)  # an asymmetric kernel: flips change the answer
    torch.testing.assert_close(tta, manual)  # the mean over the 8 mirrored predictions
