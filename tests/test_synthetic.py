import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import synthetic
from bratsunet import generator, hyperparameters, synthesis
from bratsunet.generator import MODALITIES, brats_affine, case_kind, generate_case, generate_dataset, write_case

SHAPE = (48, 48, 32)
FILE_NAMES = ("flair", "t1", "t1ce", "t2", "seg")


@pytest.fixture(scope="module")
def tumor_cases():
    return [generate_case(SHAPE, seed=seed, kind="tumor") for seed in range(3)]


def normal_brain(images, seg):
    return (images["t1"] != 0) & (seg == 0)


def test_label_sets_per_kind():
    for seed in range(3):
        for kind, expected in (("tumor", {0, 1, 2, 4}), ("no_enhancing", {0, 1, 2}), ("healthy", {0})):
            images, seg = generate_case(SHAPE, seed=seed, kind=kind)
            assert seg.dtype == np.uint8 and seg.shape == SHAPE
            assert set(np.unique(seg).tolist()) == expected, (seed, kind)
            assert all(images[m].dtype == np.int16 and images[m].shape == SHAPE for m in MODALITIES)


def test_case_kinds_mix():
    # Any 10 consecutive case numbers, and the first six, hold each kind; most cases have all three labels.
    assert {case_kind(i) for i in range(1, 7)} == {"tumor", "no_enhancing", "healthy"}
    for start in range(1, 25):
        kinds = [case_kind(i) for i in range(start, start + 10)]
        assert {"tumor", "no_enhancing", "healthy"} <= set(kinds)
        assert kinds.count("tumor") >= 6


def test_background_is_zero_and_brain_is_not(tumor_cases):
    for images, seg in tumor_cases:
        brain = images["flair"] != 0
        for m in MODALITIES:
            assert np.array_equal(images[m] != 0, brain), m  # one brain mask for all modalities
            assert images[m].min() >= 0
        assert not brain[0].any() and not brain[-1].any() and not brain[:, :, 0].any()  # skull-stripped margin
        assert np.all(brain[seg > 0])  # tumour only inside the brain
        assert 0.1 < brain.mean() < 0.4
        assert np.count_nonzero(np.unique(images["t2"][brain])) > 50  # textured, not flat


def test_region_contrasts(tumor_cases):
    for images, seg in tumor_cases:
        normal = normal_brain(images, seg)
        # The median of normal brain is white/grey matter (CSF is a small share of the voxels).
        tissue = {m: np.median(images[m][normal]) for m in MODALITIES}
        mean = lambda m, labels: images[m][np.isin(seg, labels)].mean()
        assert mean("flair", [2]) > 1.2 * tissue["flair"]  # edema bright in FLAIR
        assert mean("t2", [2]) > 1.05 * tissue["t2"]  # and in T2 (less so: grey matter is bright there too)
        assert mean("t1ce", [4]) > 1.2 * mean("t1ce", [1])  # enhancing rim brighter than necrosis
        assert mean("t1ce", [4]) > 1.2 * tissue["t1ce"]  # and than normal brain
        assert mean("t1", [1, 4]) < 0.9 * tissue["t1"]  # tumour hypointense in T1


def test_non_enhancing_core_contrast():
    images, seg = generate_case(SHAPE, seed=7, kind="no_enhancing")
    normal = normal_brain(images, seg)
    core = seg == 1
    assert images["flair"][core].mean() > 1.2 * np.median(images["flair"][normal])
    assert images["t1ce"][core].mean() < np.median(images["t1ce"][normal])  # no enhancement


def test_intensity_scale_like_real_case(sample_case):
    images, seg = generate_case(seed=0)  # full size, compared with the real case's brain means
    for m in MODALITIES:
        real = np.asanyarray(nib.load(sample_case / f"{sample_case.name}_{m}.nii.gz").dataobj)
        real_mean, mean = real[real != 0].mean(), images[m][images[m] != 0].mean()
        assert 0.7 < mean / real_mean < 1.4, m
    real_brain = (np.asanyarray(nib.load(sample_case / f"{sample_case.name}_t1.nii.gz").dataobj) != 0).sum()
    assert 0.6 < (images["t1"] != 0).sum() / real_brain < 1.3


def test_affine_matches_real_case(sample_case):
    real = nib.load(sample_case / f"{sample_case.name}_seg.nii.gz")
    np.testing.assert_array_equal(brats_affine(real.shape), real.affine)


def test_anatomy_scales_with_shape():
    small, _ = generate_case((32, 32, 24), seed=1, kind="healthy")
    large, _ = generate_case((96, 96, 64), seed=1, kind="healthy")
    assert abs((small["t1"] != 0).mean() - (large["t1"] != 0).mean()) < 0.03


def test_deterministic():
    a_images, a_seg = generate_case(SHAPE, seed=(5, 2))
    b_images, b_seg = generate_case(SHAPE, seed=(5, 2))
    c_images, c_seg = generate_case(SHAPE, seed=(5, 3))
    assert np.array_equal(a_seg, b_seg) and all(np.array_equal(a_images[m], b_images[m]) for m in MODALITIES)
    assert not np.array_equal(a_seg, c_seg) and not np.array_equal(a_images["t1"], c_images["t1"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        generate_case(SHAPE, kind="glioma")
    with pytest.raises(ValueError, match="at least 16"):
        generate_case((8, 48, 32))


@pytest.mark.parametrize("compress", [False, True])
def test_written_files(tmp_path, compress):
    images, seg = generate_case(SHAPE, seed=3)
    folder = write_case(tmp_path, "BraTS20_Training_007", images, seg, compress=compress)
    extension = ".nii.gz" if compress else ".nii"
    assert folder == tmp_path / "BraTS20_Training_007"
    assert sorted(os.listdir(folder)) == sorted(f"BraTS20_Training_007_{c}{extension}" for c in FILE_NAMES)
    for channel in FILE_NAMES:
        image = nib.load(folder / f"BraTS20_Training_007_{channel}{extension}")
        expected = seg if channel == "seg" else images[channel]
        assert image.get_data_dtype() == (np.uint8 if channel == "seg" else np.int16)
        assert image.shape == SHAPE and image.header.get_zooms() == (1.0, 1.0, 1.0)
        np.testing.assert_array_equal(image.affine, brats_affine(SHAPE))
        np.testing.assert_array_equal(np.asanyarray(image.dataobj), expected)
    if compress:
        with open(folder / f"BraTS20_Training_007_t1{extension}", "rb") as file:
            assert file.read(2) == b"\x1f\x8b"  # really gzip


def test_dataset_kinds_skip_and_identical_bytes(tmp_path):
    shape = (32, 32, 24)
    names = generate_dataset(tmp_path / "a", 10, shape, seed=4, compress=True)
    assert names == [f"BraTS20_Training_{i:03d}" for i in range(1, 11)]
    label_sets = []
    for name in names:
        seg = np.asanyarray(nib.load(tmp_path / "a" / name / f"{name}_seg.nii.gz").dataobj)
        label_sets.append(set(np.unique(seg).tolist()))
    assert {0} in label_sets and {0, 1, 2} in label_sets  # a healthy case and one without enhancing tumour
    assert sum(labels == {0, 1, 2, 4} for labels in label_sets) >= 6
    assert not list((tmp_path / "a").rglob(".*"))  # no temporary files left

    # A rerun skips complete cases; a missing file makes its case be written again, byte for byte the same.
    first = tmp_path / "a" / names[0] / f"{names[0]}_t2.nii.gz"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "a").rglob("*.nii.gz")}
    first.unlink()
    generate_dataset(tmp_path / "a", 10, shape, seed=4, compress=True)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (tmp_path / "a").rglob("*.nii.gz")}
    assert after.keys() == before.keys()
    assert all(after[p] == before[p] for p in after if p.parent != first.parent)
    assert all(after[p][1] == before[p][1] for p in after)

    # Another shape is not a complete case: it is replaced.
    generate_dataset(tmp_path / "a", 1, (40, 32, 24), seed=4, compress=True)
    assert nib.load(first).shape == (40, 32, 24)


def test_never_overwrites_real_cases(tmp_path, monkeypatch):
    # Real BraTS 2020 folders carry the same names as the phantoms.
    folder = tmp_path / "BraTS20_Training_001"
    folder.mkdir()
    real = folder / "BraTS20_Training_001_t1.nii"
    nib.save(nib.Nifti1Image(np.ones((40, 40, 30), np.int16), np.eye(4)), real)
    before = real.read_bytes()
    with pytest.raises(FileExistsError, match="BraTS20_Training_001_t1.nii"):
        generate_dataset(tmp_path, 2, (32, 32, 24), seed=0)
    monkeypatch.setattr("sys.argv", ["synthetic.py", f"raw_data_dir={tmp_path}", "synthetic_shape=32,32,24"])
    with pytest.raises(SystemExit, match="refusing to overwrite"):
        synthetic.main()
    assert real.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == [real.name]


def test_main_writes_cases(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["synthetic.py", f"raw_data_dir={tmp_path}", "synthetic_cases=2",
                                     "synthetic_shape=32,32,24", "synthetic_compress=False"])
    synthetic.main()
    for name in ("BraTS20_Training_001", "BraTS20_Training_002"):
        for channel in FILE_NAMES:
            assert nib.load(tmp_path / name / f"{name}_{channel}.nii").shape == (32, 32, 24)


# ---- the randomized style ----

RANDOM_SHAPE = (96, 96, 64)  # 2.5 mm voxels: thin enough for the enhancing rim and the folds


@pytest.fixture(scope="module")
def randomized_cases():
    return [generate_case(RANDOM_SHAPE, seed=(9, seed), kind="tumor", style="randomized") for seed in range(4)]


def boundary_labels(seg, labels, brain):
    """Labels of the brain voxels just outside the region `labels` (its outer boundary, 6-neighbours)."""
    region = np.isin(seg, labels)
    return seg[ndimage.binary_dilation(region) & ~region & brain]


def test_randomized_labels_nest(randomized_cases):
    # BraTS's nesting: necrosis inside the enhancing rim, the core inside the edema (CSF and the brain's edge cut
    # them in places, as in real scans; in the real sample 90% of the core's boundary is edema).
    for images, seg in randomized_cases:
        assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}
        brain = images["t1"] != 0
        assert np.all(brain[seg > 0])
        assert np.mean(boundary_labels(seg, [1], brain) == 4) > 0.75
        assert np.mean(boundary_labels(seg, [1, 4], brain) == 2) > 0.6


def test_randomized_intensities_in_range(randomized_cases):
    for images, seg in randomized_cases:
        brain = images["flair"] != 0
        for m, modality in enumerate(MODALITIES):
            values = images[modality][brain]
            assert images[modality].dtype == np.int16 and values.min() >= 1
            assert np.array_equal(images[modality] != 0, brain)
            # raw scanner units like BraTS: the healthy median within a factor 3 of white and grey matter's mean
            # (bias field and gain vary it), no outliers far above it
            tissue = np.mean([synthesis.INTENSITY["wm"][m], synthesis.INTENSITY["gm"][m]])
            median = np.median(images[modality][brain & (seg == 0)])
            assert tissue / 3 < median < 3 * tissue, modality
            assert np.percentile(values, 99.9) < 6 * median, modality


def test_randomized_contrasts_keep_the_tumor_signs():
    # Contrasts vary from case to case, but edema stays bright in FLAIR and T2 and the rim enhances: in nearly every case.
    signs = []
    for seed in range(12):
        images, seg = generate_case((64, 64, 48), seed=(3, seed), kind="tumor", style="randomized")
        normal = normal_brain(images, seg)
        median = {m: np.median(images[m][normal]) for m in MODALITIES}
        mean = lambda m, labels: images[m][np.isin(seg, labels)].mean()
        signs.append([mean("flair", [2]) > median["flair"], mean("t2", [2]) > median["t2"],
                      mean("t1ce", [4]) > mean("t1ce", [1]), mean("t1ce", [4]) > median["t1ce"]])
    assert np.mean(signs, axis=0).min() >= 10 / 12


def test_randomized_cases_differ_in_contrast():
    ratios = []
    for seed in range(6):
        images, seg = generate_case((64, 64, 48), seed=(4, seed), kind="healthy", style="randomized")
        brain = images["t1"] != 0
        ratios.append(np.median(images["t2"][brain]) / np.median(images["t1"][brain]))
    assert np.std(np.log(ratios)) > 0.05  # the phantom style keeps this ratio within noise


def test_style_ranges_off_is_the_phantom():
    # The phantom style is the randomized one with every range at 0; unknown styles and ranges are refused.
    phantom = generate_case((48, 48, 32), seed=3, style="phantom")
    off = generate_case((48, 48, 32), seed=3, style=dict.fromkeys(synthesis.STYLES["randomized"], 0))
    assert np.array_equal(phantom[1], off[1]) and all(np.array_equal(phantom[0][m], off[0][m]) for m in MODALITIES)
    with pytest.raises(ValueError, match="unknown synthetic style"):
        generate_case((48, 48, 32), style="realistic")
    with pytest.raises(ValueError, match="unknown style ranges"):
        generate_case((48, 48, 32), style={"contrasts": 0.1})


def test_randomized_deterministic():
    a_images, a_seg = generate_case((48, 48, 32), seed=(5, 2), style="randomized")
    b_images, b_seg = generate_case((48, 48, 32), seed=(5, 2), style="randomized")
    assert np.array_equal(a_seg, b_seg) and all(np.array_equal(a_images[m], b_images[m]) for m in MODALITIES)


def test_another_style_rewrites_the_cases(tmp_path):
    shape = (32, 32, 24)
    generate_dataset(tmp_path, 2, shape, seed=1)
    phantom = np.asanyarray(nib.load(tmp_path / "BraTS20_Training_001/BraTS20_Training_001_t1.nii").dataobj)
    generate_dataset(tmp_path, 2, shape, seed=1, style="randomized")
    randomized = np.asanyarray(nib.load(tmp_path / "BraTS20_Training_001/BraTS20_Training_001_t1.nii").dataobj)
    assert not np.array_equal(phantom, randomized)
    expected, _ = generate_case(shape, seed=(1, 1), style="randomized")
    np.testing.assert_array_equal(randomized, expected["t1"])


def test_thick_slices_interpolate_linearly():
    ramp = np.arange(10, dtype=np.float32)[None, :, None] * np.ones((2, 1, 3), np.float32)  # (2, 10, 3)
    out = synthesis._resample(ramp, np.array([0.0, 2.5, 8.75, 12.0]), axis=1)
    np.testing.assert_allclose(out[0, :, 0], [0.0, 2.5, 8.75, 9.0])  # linear inside, clamped at the end


def test_randomized_core_without_enhancement_nests():
    # A core without enhancement (label 1 only) still lies inside its edema; no label 4 appears.
    for seed in range(3):
        images, seg = generate_case((64, 64, 48), seed=(6, seed), kind="no_enhancing", style="randomized")
        brain = images["t1"] != 0
        assert set(np.unique(seg).tolist()) == {0, 1, 2}
        assert np.mean(boundary_labels(seg, [1], brain) == 2) > 0.6


def test_settings_files_choose_the_style():
    # The demo keeps the phantoms; hyperparameters_synthetic.txt is the full-size randomized recipe of the README.
    assert hyperparameters.load().synthetic_style == "phantom"
    hp = hyperparameters.load(hyperparameters.DEFAULT_FILE.parent / "hyperparameters_synthetic.txt")
    assert hp.synthetic_style == "randomized" and tuple(hp.synthetic_shape) == generator.FULL_SHAPE
