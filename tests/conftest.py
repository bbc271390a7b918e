import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The real BraTS case lies in ../shared beside the checkout; tests that need it skip when it is absent.
SAMPLE_DIR = REPO.parent / "shared" / "data" / "brats_sample"
SAMPLE_CASE = SAMPLE_DIR / "BraTS20_Training_TCGA-FG-6692"


@pytest.fixture
def sample_case():
    if not SAMPLE_CASE.is_dir():
        pytest.skip("real BraTS sample not found in ../shared/data/brats_sample")
    return SAMPLE_CASE


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory):
    """Six small generated BraTS-format cases (healthy, no-ET and full tumor cases among them). Read-only."""
    from bratsunet import generator
    folder = tmp_path_factory.mktemp("raw")
    generator.generate_dataset(folder, n_cases=6, shape=(40, 40, 32), seed=7)
    return folder


@pytest.fixture
def tiny_hp(tmp_path, tiny_raw):
    """Settings for tiny, fast runs: outputs in tmp_path, a tiny model and patch."""
    from bratsunet import hyperparameters
    return hyperparameters.load(overrides={
        "raw_data_dir": tiny_raw, "prepared_dir": tmp_path / "prepared", "run_dir": tmp_path / "run",
        "prediction_dir": tmp_path / "predictions", "num_workers": 0, "features": "4, 8, 16",
        "patch_size": "16, 16, 16", "batch_size": 2, "epochs": 2, "steps_per_epoch": 3, "val_fraction": 0.34,
        "test_fraction": 0})


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory, tiny_raw):
    """tiny_raw prepared once per session (read-only), one train/validation split: returns the prepared folder."""
    import prepare_dataset
    from bratsunet import hyperparameters
    folder = tmp_path_factory.mktemp("prepared")
    hp = hyperparameters.load(overrides={"raw_data_dir": tiny_raw, "prepared_dir": folder, "num_workers": 0,
                                         "val_fraction": 0.34, "test_fraction": 0})  # 3 train, 2 validation cases
    prepare_dataset.prepare_dataset(hp)
    return folder


def monai_scores(pred, truth, spacing):
    """MONAI Dice and HD95 per region (the independent reference); MONAI wants one-hot (B, C, ...) channels."""
    import warnings

    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    from bratsunet.conventions import REGION_NAMES, labels_to_regions
    p = torch.from_numpy(labels_to_regions(pred))[None].float()  # (1, 3, X, Y, Z)
    t = torch.from_numpy(labels_to_regions(truth))[None].float()
    # the channels are WT, TC, ET, none of them background: include_background=True keeps all three
    dice = DiceMetric(include_background=True, reduction="none")(p, t)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = HausdorffDistanceMetric(include_background=True, percentile=95)(p, t, spacing=list(spacing))[0]
    return dict(zip(REGION_NAMES, dice.tolist())), dict(zip(REGION_NAMES, hd.tolist()))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU, skipped without one (pytest -m cuda; "
                                       "benchmarks/gpu_check.sh runs them)")
