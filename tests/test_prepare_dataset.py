import json
import shutil

import nibabel as nib
import numpy as np
import pytest

import prepare_dataset
from bratsunet import cases
from bratsunet.cases import CaseError, find_cases
from bratsunet.conventions import brats_to_internal
from bratsunet.manifest import read_manifest
from prepare_dataset import prepare_dataset as prepare
from bratsunet.preprocessing import zscore_brain

CHANNELS = ("flair", "t1", "t1ce", "t2")


def raw_arrays(folder):
    """Images (C, X, Y, Z) float64 and disk labels straight from the NIfTI files."""
    name = folder.name
    load = lambda suffix: np.asanyarray(nib.load(str(next(folder.glob(f"{name}_{suffix}.nii*")))).dataobj)
    return np.stack([load(c).astype(np.float64) for c in CHANNELS]), load("seg")


def check_prepared_case(prepared_dir, record, folder):
    image = np.load(prepared_dir / record["image"], mmap_mode="r")
    labels = np.load(prepared_dir / record["seg"], mmap_mode="r")
    assert image.dtype == np.float16 and labels.dtype == np.uint8
    raw, seg = raw_arrays(folder)
    box = tuple(slice(s, e) for s, e in record["crop_box"])
    assert image.shape == (4,) + labels.shape == tuple(record["shape"])
    # Label mapping 4 -> 3, and the crop keeps every tumor voxel.
    assert np.array_equal(labels, brats_to_internal(seg)[box])
    assert (labels > 0).sum() == (seg > 0).sum() == record["tumor_voxels"]
    assert (labels == 3).sum() == (seg == 4).sum()
    # z-score over brain voxels of the whole volume, computed independently in float64; background stays 0.
    brain = (raw != 0).any(axis=0)
    for c in range(4):
        values = raw[c][brain]
        expected = np.zeros(brain.shape)
        expected[brain] = (values - values.mean()) / values.std()
        np.testing.assert_allclose(image[c], expected[box], atol=0.01 * np.abs(expected).max())
        assert np.all(image[c][~brain[box]] == 0)
        assert abs(image[c][brain[box]].astype(np.float64).mean()) < 1e-2
        assert abs(image[c][brain[box]].astype(np.float64).std() - 1) < 1e-2


def test_generated_cases_manifest_split_and_filtering(tiny_raw, tiny_prepared):
    manifest = read_manifest(tiny_prepared)
    cases = manifest["cases"]
    assert manifest["channel_names"] == list(CHANNELS)
    # the generator's healthy cases are filtered and listed with a reason, the rest is kept
    healthy = [f.name for f in tiny_raw.iterdir() if not raw_arrays(f)[1].any()]
    assert healthy and sorted(manifest["filtered"]) == sorted(healthy)
    assert all("healthy: tumor share 0.0000% (0 voxels)" in reason for reason in manifest["filtered"].values())
    assert sorted(cases) == sorted(f.name for f in tiny_raw.iterdir() if f.name not in healthy)
    splits = [c["split"] for c in cases.values()]
    assert splits.count("val") == round(0.34 * len(cases)) and splits.count("train") == len(cases) - splits.count("val")
    for name, record in cases.items():
        folder = tiny_raw / name
        check_prepared_case(tiny_prepared, record, folder)
        first = nib.load(str(next(folder.glob("*_flair.nii*"))))
        assert record["original_shape"] == list(first.shape)
        np.testing.assert_allclose(record["affine"], first.affine)
        assert record["source_files"]["seg"].endswith("_seg.nii")


def test_real_sample_is_kept_and_prepared_correctly(sample_case, tmp_path, tiny_hp):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / sample_case.name).symlink_to(sample_case)
    hp = tiny_hp.replace(raw_data_dir=tmp_path / "raw", prepared_dir=tmp_path / "p")
    manifest = prepare(hp)
    assert list(manifest["cases"]) == [sample_case.name] and not manifest["skipped"]
    check_prepared_case(hp.prepared_dir, manifest["cases"][sample_case.name], sample_case)


def test_rerun_skips_prepared_cases_and_redoes_changed_settings(tiny_hp, monkeypatch):
    prepare(tiny_hp)
    manifest = read_manifest(tiny_hp.prepared_dir)
    calls = []
    original = cases.load_case
    monkeypatch.setattr(prepare_dataset, "load_case", lambda case, *grid: calls.append(case.name) or original(case, *grid))
    assert prepare(tiny_hp) == manifest and calls == []
    changed = prepare(tiny_hp.replace(crop_margin=2))
    assert len(calls) == 6  # every case redone, healthy ones included
    name = next(iter(changed["cases"]))
    assert np.array(changed["cases"][name]["shape"][1:]).sum() > np.array(manifest["cases"][name]["shape"][1:]).sum()


def test_parallel_workers_give_identical_outputs(tiny_hp, tmp_path):
    serial = prepare(tiny_hp)
    parallel = prepare(tiny_hp.replace(prepared_dir=tmp_path / "parallel", num_workers=2))
    assert serial["cases"] == parallel["cases"]
    for name in serial["cases"]:
        for suffix in (".npy", "_seg.npy"):
            assert (tiny_hp.prepared_dir / f"{name}{suffix}").read_bytes() == \
                   (tmp_path / "parallel" / f"{name}{suffix}").read_bytes()


def test_bad_cases_are_skipped_with_reasons_and_the_run_goes_on(tiny_raw, tiny_hp, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(tiny_raw, raw)
    cases = sorted(raw.iterdir())
    (cases[0] / f"{cases[0].name}_flair.nii").write_bytes(b"")  # zero-byte file
    (cases[1] / f"{cases[1].name}_t2.nii").unlink()  # missing modality
    manifest = prepare(tiny_hp.replace(raw_data_dir=raw))
    assert "empty file (0 bytes)" in manifest["skipped"][cases[0].name]
    assert f"{cases[0].name}_flair.nii" in manifest["skipped"][cases[0].name]
    assert "missing modality t2" in manifest["skipped"][cases[1].name]
    assert len(manifest["cases"]) + len(manifest["filtered"]) == 4
    assert not list(tiny_hp.prepared_dir.glob(".tmp*"))  # nothing half-written


def test_kaggle_nesting_gz_misnamed_segmentation_unlabeled_cases_and_csv(tiny_raw, tiny_hp, tmp_path):
    nested = tmp_path / "archive" / "BraTS2020_TrainingData" / "MICCAI_BraTS2020_TrainingData"
    shutil.copytree(tiny_raw, nested)
    (nested / "name_mapping.csv").write_text("a,b\n")
    (nested / "survival_info.csv").write_text("a,b\n")
    cases = sorted(p for p in nested.iterdir() if p.is_dir())
    # BraTS 2020 case 355 ships its segmentation as W39_1998.09.19_Segm.nii
    (cases[0] / f"{cases[0].name}_seg.nii").rename(cases[0] / "W39_1998.09.19_Segm.nii")
    # a validation-style case: no segmentation, other name, gzipped
    unlabeled = tmp_path / "archive" / "Validation" / "BraTS20_Validation_001"
    unlabeled.mkdir(parents=True)
    for channel in CHANNELS:
        image = nib.load(str(cases[1] / f"{cases[1].name}_{channel}.nii"))
        nib.save(image, str(unlabeled / f"BraTS20_Validation_001_{channel}.nii.gz"))
    found, problems = find_cases(tmp_path / "archive", CHANNELS, "seg")
    assert not problems and len(found) == 7
    assert {c.name: c for c in found}[cases[0].name].seg_path.name == "W39_1998.09.19_Segm.nii"
    manifest = prepare(tiny_hp.replace(raw_data_dir=tmp_path / "archive"))
    assert manifest["cases"]["BraTS20_Validation_001"]["split"] == "unlabeled"
    assert manifest["cases"]["BraTS20_Validation_001"]["seg"] is None
    assert cases[0].name in manifest["cases"] or cases[0].name in manifest["filtered"]


def test_missing_or_empty_raw_dir_and_missing_manifest(tmp_path):
    with pytest.raises(CaseError, match="raw_data_dir does not exist"):
        find_cases(tmp_path / "nope", CHANNELS, "seg")
    with pytest.raises(CaseError, match="no case folders with NIfTI files"):
        find_cases(tmp_path, CHANNELS, "seg")
    with pytest.raises(FileNotFoundError, match="run prepare_dataset.py first"):
        read_manifest(tmp_path)


def test_zscore_uses_brain_voxels_only():
    image = np.zeros((2, 6, 6, 6), np.float32)
    image[0, 1:5, 1:5, 1:5] = np.arange(64).reshape(4, 4, 4)  # one brain voxel of channel 0 is 0: still brain
    image[1, 1:5, 1:5, 1:5] = 5.0  # constant channel: std 0 must not divide by zero
    out = zscore_brain(image)
    brain = out[0, 1:5, 1:5, 1:5]
    np.testing.assert_allclose([brain.mean(), brain.std()], [0, 1], atol=1e-5)
    assert out[:, 0].sum() == 0 and np.all(out[1, 1:5, 1:5, 1:5] == 0)


def test_healthy_threshold_keeps_typical_tumors(tiny_hp, tiny_prepared):
    manifest = read_manifest(tiny_prepared)
    shares = [1 - r["tumor_voxels"] / r["brain_voxels"] for r in manifest["cases"].values()]
    assert max(shares) < tiny_hp.bg_threshold
    record = json.loads((tiny_prepared / f"{next(iter(manifest['filtered']))}.json").read_text())
    assert record["tumor_voxels"] == 0 and record["image"] is None
