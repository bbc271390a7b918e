"""evaluate.py lesion_wise: the official brats-evaluation package's numbers next to ours: the same global Dice on
real segmentations, hand-worked lesion counts and Dice, its rules for empty regions and missing predictions."""
import csv
import sys

import nibabel as nib
import numpy as np
import pytest

import evaluate
from bratsunet import evaluation, hyperparameters
from bratsunet.cases import CaseError

AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def save(path, labels, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), path)
    return path


def constructed_cases():
    """{case: (prediction, truth)} in BraTS 2023 labels (3 = ET, 2 = edema) on a 30^3 grid."""
    empty = lambda: np.zeros((30, 30, 30), np.uint8)
    cases = {}
    t, p = empty(), empty()  # two true ET lesions: one found exactly, one missed; one false lesion
    t[2:4, 2:4, 2:4] = t[20:23, 20:23, 20:23] = p[2:4, 2:4, 2:4] = p[10, 10, 10] = 3
    cases["several"] = p, t
    t, p = empty(), empty()  # one true 2 x 2 x 6 bar predicted as its two 2 x 2 x 2 ends
    t[5:7, 5:7, 5:11] = p[5:7, 5:7, 5:7] = p[5:7, 5:7, 9:11] = 3
    cases["split"] = p, t
    t, p = empty(), empty()  # the other way round: two true cubes predicted as one bar
    t[5:7, 5:7, 5:7] = t[5:7, 5:7, 9:11] = p[5:7, 5:7, 5:11] = 3
    cases["merged"] = p, t
    t, p = empty(), empty()  # edema only in both: ET and TC empty in both
    t[5:7, 5:7, 5:7] = p[5:7, 5:7, 5:7] = 2
    cases["no_et"] = p, t
    p = p.copy()  # and a one-voxel false ET
    p[20, 20, 20] = 3
    cases["false_et"] = p, t
    return cases


@pytest.fixture(scope="module")
def constructed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lesions")
    pairs = {name: (save(folder / "pred" / f"{name}.nii.gz", p), save(folder / "truth" / f"{name}.nii.gz", t))
             for name, (p, t) in constructed_cases().items()}
    return folder, evaluation.lesion_wise_metrics(pairs, ["no_prediction"], "gli", "brats2023")


def pick(row, region, *keys):
    return [row[f"{key}_{region}"] for key in keys]


def test_several_split_and_merged_lesions_give_the_hand_worked_numbers(constructed):
    _, official = constructed
    keys = ("all_instance_tp", "all_instance_fp", "all_instance_fn", "all_instance_f1", "global_dsc",
            "lesionwise_dsc_mean")
    # several: 1 matched (Dice 1), 1 missed, 1 false: F1 = 2 / (2 + 1 + 1); global Dice 2 * 8 / (9 + 35)
    assert pick(official["several"], "et", *keys) == pytest.approx([1, 1, 1, 0.5, 16 / 44, 1.0])
    # split: one end matched (Dice 2 * 8 / (8 + 24) = 0.5), the other end a false lesion; global 2 * 16 / 40
    assert pick(official["split"], "et", *keys) == pytest.approx([1, 1, 0, 2 / 3, 0.8, 0.5])
    # the matched end lies 0..4 mm from the bar's far end: HD95 of that lesion 4 mm
    assert official["split"]["lesionwise_hd95_mean_et"] == pytest.approx(4.0)
    # merged: the bar matches one cube (Dice 0.5), the other cube is missed
    assert pick(official["merged"], "et", *keys) == pytest.approx([1, 0, 1, 2 / 3, 0.8, 0.5])
    # ET lies inside TC and WT: the same lesions there
    assert pick(official["split"], "tc", *keys) == pick(official["split"], "et", *keys)


def test_empty_regions_and_missing_predictions_follow_the_package(constructed):
    _, official = constructed
    # both empty: the package gives NaN (BraTS 2020 rules: Dice 1, HD95 0); WT is there and perfect
    assert np.isnan(pick(official["no_et"], "et", "global_dsc", "lesionwise_dsc_mean", "lesionwise_hd95_mean")).all()
    assert pick(official["no_et"], "wt", "global_dsc", "lesionwise_dsc_mean") == [1.0, 1.0]
    # a false ET lesion in a case without ET: Dice 0, global HD95 373, lesion-wise HD95 infinite
    assert pick(official["false_et"], "et", "all_instance_fp", "global_dsc", "lesionwise_dsc_mean",
                "global_hd95", "lesionwise_hd95_mean") == [1, 0, 0, 373, np.inf]
    # no prediction at all: the package's penalty, 0 and HD95 373, in every region
    missing = official["no_prediction"]
    for region in ("wt", "tc", "et", "netc", "snfh", "rc"):
        assert pick(missing, region, "global_dsc", "lesionwise_dsc_mean", "global_hd95", "lesionwise_hd95_mean") == \
            [0, 0, 373, 373]
    assert len(missing) == len(official["several"]) == 6 * 15  # 15 columns for each of gli's 6 regions


def test_legacy_dice_equals_the_packages_global_dice_on_real_segmentations(sample_case, tmp_path):
    references = sorted((sample_case.parent / "reference_segmentations").glob("*.nii.gz"))
    arrays = [np.asanyarray(nib.load(path).dataobj) for path in references]
    affine = nib.load(references[0]).affine
    box = tuple(slice(max(a.min() - 3, 0), a.max() + 4) for a in np.nonzero(np.any(arrays, axis=0)))  # all tumor
    paths = [save(tmp_path / f"{path.name}", array[box], affine) for path, array in zip(references, arrays)]
    pairs = {f"{a.name}_vs_{b.name}": (a, b) for a, b in zip(paths, paths[1:] + paths[:1])}  # each against the next
    official = evaluation.lesion_wise_metrics(pairs, [], "gli", "brats2020")
    assert len(official) == 5
    for name, (pred, truth) in pairs.items():
        ours = evaluation.evaluate_pair(pred, truth)
        for region in ("WT", "TC", "ET"):
            assert official[name][f"global_dsc_{region.lower()}"] == pytest.approx(ours[region]["dice"], abs=1e-12)


def test_evaluate_writes_both_and_the_summary_says_which_is_which(constructed, tmp_path, capsys):
    folder, official = constructed
    hp = hyperparameters.load(overrides={"prediction_dir": folder / "pred", "raw_data_dir": folder / "truth",
                                         "predict_input_dir": folder / "truth", "run_dir": tmp_path / "run",
                                         "data_format": "brats2023", "lesion_wise": True})
    (folder / "pred" / "split.nii.gz").rename(tmp_path / "split.nii.gz")  # this one has no prediction now
    try:
        rows = evaluate.evaluate(hp)
    finally:
        (tmp_path / "split.nii.gz").rename(folder / "pred" / "split.nii.gz")
    with open(hp.prediction_dir / "evaluation.csv", newline="") as file:
        table = {row["case"]: row for row in csv.DictReader(file)}
    assert sorted(table) == sorted(constructed_cases()) and len(rows) == 5  # the missing case scored as a failure
    assert float(table["split"]["dice_ET"]) == 0 and float(table["split"]["hd95_ET"]) == 373.13  # BraTS's penalty
    assert float(table["split"]["global_hd95_et"]) == 373  # and the package's
    several = table["several"]
    assert float(several["dice_ET"]) == pytest.approx(16 / 44) == pytest.approx(float(several["global_dsc_et"]))
    assert float(several["lesionwise_dsc_mean_et"]) == official["several"]["lesionwise_dsc_mean_et"]
    out = capsys.readouterr().out
    assert "evaluated with the BraTS 2020 metrics (this project's" in out
    assert "lesion-wise metrics of the official package brats-evaluation 0.0.10 (configuration gli), 5 case(s), " \
           "1 without a prediction" in out


def test_lesion_wise_without_the_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "brats_evaluation", None)  # as if it were not installed
    with pytest.raises(CaseError, match=r"^lesion_wise: True needs the official BraTS evaluation package: "
                                        r"pip install brats-evaluation$"):
        evaluation.lesion_wise_metrics({}, [], "gli")
