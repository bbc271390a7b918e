"""The anatomy style (bratsunet/anatomy.py): cases on the label maps of real brains. Tests that need the maps skip
without them (../shared/data/anatomy/synthseg beside the checkout: SynthSeg's data/training_label_maps)."""
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO
from scipy import ndimage

import predict
import synthetic
from bratsunet import anatomy, checkpoints, generator, hyperparameters, synthesis

MAPS_DIR = REPO.parent / "shared" / "data" / "anatomy" / "synthseg"
SHIPPED_MODEL = REPO / "models" / "anatomy.pt"  # trained on anatomy-style cases only (docs/synthetic-data.md)
REAL_BRAIN_CENTRE = (118.6, 135.2, 75.3)  # voxel centroid of the real sample's brain mask


@pytest.fixture(scope="module")
def maps():
    if not MAPS_DIR.is_dir():
        pytest.skip("label maps not found in ../shared/data/anatomy/synthseg (SynthSeg's data/training_label_maps)")
    return anatomy.label_maps(MAPS_DIR, "training")[:1]  # one map: each map takes about 2 s to read


@pytest.fixture(scope="module")
def tumor_case(maps):
    return generator.generate_case(generator.FULL_SHAPE, (5, 1), "tumor", "anatomy", maps)


def test_training_and_validation_maps_are_disjoint():
    if not MAPS_DIR.is_dir():
        pytest.skip("label maps not found in ../shared/data/anatomy/synthseg")
    training, validation = anatomy.label_maps(MAPS_DIR, "training"), anatomy.label_maps(MAPS_DIR, "validation")
    assert not set(training) & set(validation)
    assert len(training) == 15 and len(validation) == 5 and len(set(training + validation)) == 20


def test_brain_sits_where_a_brats_brain_sits(tumor_case, maps):
    images, seg = tumor_case
    brain = images["t1"] != 0
    assert np.linalg.norm(np.argwhere(brain).mean(axis=0) - REAL_BRAIN_CENTRE) < 12
    assert 1.0e6 < brain.sum() < 2.2e6
    # Orientation (LPS arrays): the cerebellum lies behind (larger y) and below (smaller z) the brain's centre.
    source = anatomy.load_map(str(maps[0]))
    rng = np.random.default_rng(0)
    matrix, offset = anatomy.placement(rng, source)
    box = anatomy.grid_box(source, matrix, offset, generator.FULL_SHAPE, np.ones(3), 2)
    codes = anatomy.sample_codes(rng, source, matrix, offset, box, np.ones(3), synthesis.STYLES["anatomy"], None)
    centre = np.argwhere(codes > 0).mean(axis=0)
    cerebellum = np.argwhere(np.isin(codes, anatomy.CEREBELLUM)).mean(axis=0)
    assert cerebellum[1] > centre[1] + 5 and cerebellum[2] < centre[2] - 30 and abs(cerebellum[0] - centre[0]) < 8


def test_skull_stripped(tumor_case):
    images, seg = tumor_case
    brain = images["flair"] != 0
    for modality in generator.MODALITIES:
        assert np.array_equal(images[modality] != 0, brain), modality  # one mask, background exactly 0
        assert images[modality].min() >= 0
    assert np.all(brain[seg > 0])
    assert ndimage.label(brain)[1] == 1  # one brain, no scalp or eyes
    assert (ndimage.binary_fill_holes(brain) & ~brain).sum() < 0.001 * brain.sum()  # sulci and fissures kept


def test_tumor_labels_nest(tumor_case):
    images, seg = tumor_case
    brain = images["t1"] != 0
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}
    core = np.isin(seg, (1, 4))
    outside = ndimage.binary_dilation(core) & ~core & brain
    assert np.mean(seg[outside] == 2) > 0.6  # the core in its edema (CSF and the brain's edge cut it in places)
    necrosis = seg == 1
    assert np.mean(seg[ndimage.binary_dilation(necrosis) & ~necrosis & brain] == 4) > 0.75  # inside its rim


def test_core_without_enhancement_nests(maps):
    images, seg = generator.generate_case((96, 96, 64), (5, 2), "no_enhancing", "anatomy", maps)
    assert set(np.unique(seg).tolist()) == {0, 1, 2}
    core = seg == 1
    assert np.mean(seg[ndimage.binary_dilation(core) & ~core & (images["t1"] != 0)] == 2) > 0.6


def test_tumor_starts_in_white_matter(maps):
    source = anatomy.load_map(str(maps[0]))
    rng = np.random.default_rng(3)
    matrix, offset = anatomy.placement(rng, source)
    for _ in range(5):
        centre = anatomy.tumor_centre(rng, source, matrix, offset, generator.FULL_SHAPE, np.ones(3))
        voxel = np.rint(matrix @ centre + offset).astype(int)
        assert source.codes[tuple(voxel)] == anatomy.WHITE_MATTER


def test_reproducible_for_a_seed(maps):
    first = generator.generate_case((96, 96, 64), (5, 3), "tumor", "anatomy", maps)
    again = generator.generate_case((96, 96, 64), (5, 3), "tumor", "anatomy", maps)
    other = generator.generate_case((96, 96, 64), (5, 4), "tumor", "anatomy", maps)
    assert np.array_equal(first[1], again[1]) and not np.array_equal(first[1], other[1])
    assert all(np.array_equal(first[0][m], again[0][m]) for m in generator.MODALITIES)


def test_main_writes_anatomy_cases(tmp_path, monkeypatch, maps):
    monkeypatch.setattr("sys.argv", ["synthetic.py", f"raw_data_dir={tmp_path}", "synthetic_cases=1",
                                     "synthetic_shape=64,64,48", "synthetic_style=anatomy", f"anatomy_dir={MAPS_DIR}"])
    synthetic.main()
    image = nib.load(tmp_path / "BraTS20_Training_001" / "BraTS20_Training_001_flair.nii")
    assert image.shape == (64, 64, 48) and image.header["aux_file"] == b"anatomy"


def test_missing_or_bad_maps_name_the_setting_or_file(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="anatomy_dir"):
        anatomy.label_maps(None)
    with pytest.raises(ValueError, match=str(tmp_path)):
        anatomy.label_maps(tmp_path)
    (tmp_path / "broken.nii.gz").write_bytes(b"not a label map")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        anatomy.load_map(str(tmp_path / "broken.nii.gz"))
    nib.save(nib.Nifti1Image(np.full((20, 20, 20), 2, np.int16), np.eye(4)), tmp_path / "small.nii.gz")
    with pytest.raises(ValueError, match="small.nii.gz.*FreeSurfer"):
        anatomy.load_map(str(tmp_path / "small.nii.gz"))
    monkeypatch.setattr("sys.argv", ["synthetic.py", f"raw_data_dir={tmp_path / 'out'}", "synthetic_style=anatomy"])
    with pytest.raises(SystemExit, match="anatomy_dir"):
        synthetic.main()
    assert hyperparameters.load(overrides={"synthetic_style": "anatomy"}).anatomy_dir is None


def test_settings_file_chooses_the_anatomy_style():
    hp = hyperparameters.load(REPO / "hyperparameters_anatomy.txt")
    assert hp.synthetic_style == "anatomy" and hp.anatomy_dir == MAPS_DIR.resolve()
    assert tuple(hp.synthetic_shape) == generator.FULL_SHAPE


def test_shipped_model_loads_safely_with_the_settings_predict_needs():
    assert SHIPPED_MODEL.stat().st_size < 5e6
    torch.load(SHIPPED_MODEL, map_location="cpu", weights_only=True)  # plain tensors and values: no code runs
    model, checkpoint = checkpoints.load_model(SHIPPED_MODEL)
    settings = checkpoints.trained_settings(checkpoint)
    assert set(settings) == set(checkpoints.TRAINED_SETTINGS)
    assert list(settings["channel_names"]) == list(generator.MODALITIES) and settings["target"] == "regions"
    hp = hyperparameters.load().updated(settings, f"{SHIPPED_MODEL}: the settings it was trained with")
    with torch.no_grad():
        out = model(torch.zeros(1, len(hp.channel_names), *hp.patch_size))
    assert out.shape == (1, 3, *hp.patch_size) and torch.isfinite(out).all()


def test_the_shipped_models_generated_cases_are_not_taken_for_real_cases_of_their_names(capsys):
    checkpoint = torch.load(SHIPPED_MODEL, map_location="cpu", weights_only=True)
    assert not {"optimizer", "scheduler", "scaler", "rng"} & set(checkpoint)  # what only resuming needs
    assert not any(str(value).startswith("/") for key, value in checkpoint["hyperparameters"].items()
                   if key.endswith("_dir"))  # no folder of the machine it trained on
    real_names = [f"BraTS20_Training_{number:03d}" for number in range(1, 370)]  # the test split of a BraTS download
    predict.refuse_seen_cases(real_names, [SHIPPED_MODEL])  # trained on generated cases: nothing refused
    with pytest.raises(ValueError, match="trained or validated on 3 case"):
        predict.refuse_seen_cases(checkpoint["split"]["val"], [SHIPPED_MODEL])
