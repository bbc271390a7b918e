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
