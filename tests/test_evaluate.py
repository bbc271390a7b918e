"""evaluate.py end to end through files: the CSV against MONAI and hand-computed values, the BraTS rules for
empty regions, the spacing from the header, grids that do not match, the summary and the speed."""
import csv
import itertools
import time

import nibabel as nib
import numpy as np
import pytest

import evaluate
from bratsunet import cases, evaluation, hyperparameters
from bratsunet.cases import CaseError
from bratsunet.conventions import REGION_NAMES, brats_to_internal, labels_to_regions
from bratsunet.metrics import HD95_EMPTY

from conftest import SAMPLE_DIR, monai_scores

REFERENCE_DIR = SAMPLE_DIR / "reference_segmentations"


def write_label_map(path, disk_labels, spacing=(1.0, 1.0, 1.0), offset=(0.0, 0.0, 0.0)):
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = offset
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(disk_labels, dtype=np.uint8), affine), path)
    return path


def run_evaluate(tmp_path, pred_dir, truth_dir):
    """evaluate() on two folders -> {case: {column: float}} read back from evaluation.csv."""
    hp = hyperparameters.load(overrides={"prediction_dir": pred_dir, "raw_data_dir": truth_dir,
                                         "run_dir": tmp_path / "run"})
    evaluate.evaluate(hp)
    with open(hp.prediction_dir / "evaluation.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert tuple(rows[0]) == evaluation.COLUMNS
    return {row["case"]: {key: float(value) for key, value in row.items() if key != "case"} for row in rows}


def test_hand_computed_cases_with_anisotropic_spacing_in_the_header(tmp_path):
    spacing = (1.0, 1.0, 2.5)  # mm; z voxels are 2.5 mm apart
    pred, truth = np.zeros((2, 10, 10, 10), np.uint8)
    pred[2, 2, 2], truth[2, 2, 5] = 4, 4  # one enhancing voxel each, 3 slices apart
    write_label_map(tmp_path / "pred" / "voxels.nii.gz", pred, spacing)
    write_label_map(tmp_path / "truth" / "voxels.nii.gz", truth, spacing)
    pred, truth = np.zeros((2, 10, 10, 10), np.uint8)
    truth[2:4, 2:4, 2:4] = 2  # 8 edema voxels
    pred[2:4, 2:4, 2:3] = 2  # their lower half
    write_label_map(tmp_path / "pred" / "cube.nii", pred, spacing)
    write_label_map(tmp_path / "truth" / "cube.nii.gz", truth, spacing)
    results = run_evaluate(tmp_path, tmp_path / "pred", tmp_path / "truth")
    for region in REGION_NAMES:  # ET is inside TC inside WT: all three regions are the single voxels
        voxels = {metric: results["voxels"][f"{metric}_{region}"] for metric in evaluation.METRICS}
        assert voxels == pytest.approx({"dice": 0.0, "hd95": 7.5, "sensitivity": 0.0, "specificity": 998 / 999,
                                        "volume_pred": 2.5, "volume_true": 2.5})
    cube = results["cube"]
    # WT: Dice 2*4/(4+8); the 4 truth voxels of the upper half are 2.5 mm from the prediction's surface,
    # the rest 0: the 95th percentile of (0,0,0,0,2.5,2.5,2.5,2.5) is 2.5
    assert [cube[f"{m}_WT"] for m in evaluation.METRICS] == pytest.approx([2 / 3, 2.5, 0.5, 1.0, 10.0, 20.0])
    for region in ("TC", "ET"):  # empty in both: Dice 1, HD95 0
        assert [cube[f"{m}_{region}"] for m in evaluation.METRICS] == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def test_empty_regions_follow_the_brats_rules_and_are_counted(tmp_path, capsys):
    shape = (12, 12, 12)
    tumor = np.zeros(shape, np.uint8)
    tumor[3:9, 3:9, 3:9] = 2
    tumor[5:7, 5:7, 5:7] = 4
    edema = np.where(tumor > 0, 2, 0)
    cases = {"healthy": (np.zeros(shape), np.zeros(shape)),  # (prediction, truth)
             "missed_et": (edema, tumor), "false_et": (tumor, edema)}
    for name, (pred, truth) in cases.items():
        write_label_map(tmp_path / "pred" / f"{name}.nii.gz", pred)
        write_label_map(tmp_path / "truth" / f"{name}.nii.gz", truth)
    results = run_evaluate(tmp_path, tmp_path / "pred", tmp_path / "truth")
    for region in REGION_NAMES:  # nothing in either: perfect
        assert results["healthy"][f"dice_{region}"] == 1.0 and results["healthy"][f"hd95_{region}"] == 0.0
    for name in ("missed_et", "false_et"):  # ET in one only: Dice 0, HD95 373.13 mm; WT agrees
        assert results[name]["dice_ET"] == 0.0 and results[name]["hd95_ET"] == HD95_EMPTY
        assert results[name]["dice_WT"] == 1.0 and results[name]["hd95_WT"] == 0.0
    assert results["false_et"]["sensitivity_ET"] == 1.0  # no true ET to miss
    assert results["missed_et"]["sensitivity_ET"] == 0.0
    out = capsys.readouterr().out
    # truth empty: WT healthy; TC and ET healthy, false_et. Prediction empty: WT healthy; TC and ET healthy, missed_et
    assert "cases with an empty region, ground truth / prediction: WT 1 / 1, TC 2 / 2, ET 2 / 2" in out


def check_against_monai(results, pairs):
    """pairs: {case: (pred internal labels, truth internal labels, spacing)}."""
    for name, (pred, truth, spacing) in pairs.items():
        # MONAI is slow on 240 x 240 x 155: it gets the tumors' bounding box (same scores), evaluate the files
        box = tuple(slice(max(i.min() - 2, 0), i.max() + 3) for i in np.nonzero((pred > 0) | (truth > 0)))
        dice, hd = monai_scores(pred[box], truth[box], spacing)
        voxel = np.prod(spacing)
        for region, p, t in zip(REGION_NAMES, labels_to_regions(pred), labels_to_regions(truth)):
            assert results[name][f"dice_{region}"] == pytest.approx(dice[region], rel=1e-6)
            assert results[name][f"hd95_{region}"] == pytest.approx(hd[region], rel=1e-5)
            assert results[name][f"hd95_{region}"] > 0
            assert results[name][f"sensitivity_{region}"] == pytest.approx((p & t).sum() / t.sum(), rel=1e-9)
            assert results[name][f"specificity_{region}"] == pytest.approx((~p & ~t).sum() / (~t).sum(), rel=1e-9)
            assert results[name][f"volume_pred_{region}"] == pytest.approx(p.sum() * voxel, rel=1e-6)
            assert results[name][f"volume_true_{region}"] == pytest.approx(t.sum() * voxel, rel=1e-6)


def test_csv_matches_monai_on_real_reference_segmentations(tmp_path):
    files = sorted(REFERENCE_DIR.glob("*.nii.gz"))
    if len(files) < 5:
        pytest.skip("real reference segmentations not found in ../shared/data/brats_sample")
    pairs = {}
    for index, (a, b) in enumerate([(0, 1), (2, 3), (4, 0)]):  # algorithm a judged against algorithm b
        (tmp_path / "pred").mkdir(exist_ok=True)
        (tmp_path / "truth").mkdir(exist_ok=True)
        (tmp_path / "pred" / f"pair{index}.nii.gz").symlink_to(files[a])
        (tmp_path / "truth" / f"pair{index}.nii.gz").symlink_to(files[b])
        pairs[f"pair{index}"] = [brats_to_internal(np.asanyarray(nib.load(f).dataobj)) for f in (files[a], files[b])]
    # one pair again in an anisotropic grid: HD95 and volumes must follow the header's spacing
    spacing = (0.9, 1.1, 2.0)
    for folder, labels in zip(("pred", "truth"), pairs["pair1"]):
        write_label_map(tmp_path / folder / "anisotropic.nii", np.asarray((0, 1, 2, 4))[labels], spacing)
    pairs = {name: (*labels, (1.0, 1.0, 1.0)) for name, labels in pairs.items()}
    pairs["anisotropic"] = (*pairs["pair1"][:2], spacing)
    results = run_evaluate(tmp_path, tmp_path / "pred", tmp_path / "truth")
    assert sorted(results) == sorted(pairs)
    check_against_monai(results, pairs)
    assert results["anisotropic"]["hd95_WT"] != pytest.approx(results["pair1"]["hd95_WT"])


def ball(shape, center, radius):
    grid = np.indices(shape).astype(float)
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius ** 2


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.3, 2.5)])
def test_csv_matches_monai_on_generated_shapes(tmp_path, spacing):
    rng = np.random.default_rng(4)
    shape, pairs = (40, 36, 28), {}
    for case in range(3):
        maps = []
        for shift in (np.zeros(3), rng.uniform(-3, 3, 3)):  # the prediction is the truth moved and resized
            center = np.array([20, 18, 14]) + shift
            labels = np.zeros(shape, np.uint8)
            labels[ball(shape, center, 10 + rng.uniform(-2, 2))] = 2
            labels[ball(shape, center + rng.uniform(-2, 2, 3), 6)] = 1
            labels[ball(shape, center + rng.uniform(-1, 1, 3), 3)] = 3
            maps.append(labels)
        truth, pred = maps
        write_label_map(tmp_path / "pred" / f"case{case}.nii.gz", np.asarray((0, 1, 2, 4))[pred], spacing)
        write_label_map(tmp_path / "truth" / f"case{case}.nii.gz", np.asarray((0, 1, 2, 4))[truth], spacing)
        pairs[f"case{case}"] = (pred, truth, spacing)
    check_against_monai(run_evaluate(tmp_path, tmp_path / "pred", tmp_path / "truth"), pairs)


def test_mismatched_grids_are_reported_naming_both_files(tmp_path, capsys):
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[3:6, 3:6, 3:6] = 2
    truth = {name: write_label_map(tmp_path / "truth" / f"{name}.nii.gz", labels)
             for name in ("good", "shape", "affine")}
    pred = {"good": write_label_map(tmp_path / "pred" / "good.nii.gz", labels),
            "shape": write_label_map(tmp_path / "pred" / "shape.nii.gz", labels[:, :, :9]),
            "affine": write_label_map(tmp_path / "pred" / "affine.nii.gz", labels, offset=(0, 0, 5)),
            "orphan": write_label_map(tmp_path / "pred" / "orphan.nii.gz", labels),
            "bad_labels": write_label_map(tmp_path / "pred" / "bad_labels.nii.gz", labels + 1)}
    (tmp_path / "pred" / ".tmp123-partial.nii.gz").write_bytes(b"")  # another run's temporary file: ignored
    write_label_map(tmp_path / "truth" / "bad_labels.nii.gz", labels)
    rows, not_evaluated = evaluation.evaluate_folders(tmp_path / "pred", tmp_path / "truth", ("flair",), "seg")
    assert [row["case"] for row in rows] == ["good"] and rows[0]["dice_WT"] == 1.0
    assert sorted(not_evaluated) == ["affine", "bad_labels", "orphan", "shape"]
    for name in ("shape", "affine"):
        assert str(pred[name]) in not_evaluated[name] and str(truth[name]) in not_evaluated[name]
    assert "(10, 10, 9)" in not_evaluated["shape"] and "affine differs" in not_evaluated["affine"]
    assert "unexpected label values [3]" in not_evaluated["bad_labels"]
    assert "no ground truth" in not_evaluated["orphan"]
    assert f"skipped shape: {pred['shape']}" in capsys.readouterr().out


def test_evaluate_against_raw_case_folders(tmp_path, tiny_raw, capsys):
    names = sorted(p.name for p in tiny_raw.iterdir() if p.is_dir())[:3]
    for name in names:  # the ground truth itself as the prediction
        (tmp_path / "pred").mkdir(exist_ok=True)
        (tmp_path / "pred" / f"{name}.nii").write_bytes((tiny_raw / name / f"{name}_seg.nii").read_bytes())
    hp = hyperparameters.load(overrides={"prediction_dir": tmp_path / "pred", "raw_data_dir": tiny_raw,
                                         "run_dir": tmp_path / "run"})
    rows = evaluate.evaluate(hp)
    assert [row["case"] for row in rows] == names
    assert all(row[f"dice_{r}"] == 1.0 and row[f"hd95_{r}"] == 0.0 for row in rows for r in REGION_NAMES)
    assert not hp.run_dir.exists()  # the evaluation lies beside the predictions it scores
    assert sorted(p.name for p in hp.prediction_dir.iterdir() if not p.name.endswith(".nii")) == [
        "evaluation.csv", "evaluation_boxplot.png"]
    assert (hp.prediction_dir / "evaluation_boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "3 case(s) evaluated" in out
    assert "".join(f"{s:>9}" for s in evaluation.STATISTICS) in out
    assert sum(line.startswith(("dice", "hd95", "sensitivity", "specificity")) for line in out.splitlines()) == 12


def test_a_second_prediction_folder_keeps_the_first_ones_evaluation(tmp_path, tiny_raw, capsys):
    """Two prediction folders evaluated one after the other (TTA on and off, another checkpoint): each keeps its own
    evaluation.csv beside its predictions, and the run says where it wrote it."""
    name = sorted(p.name for p in tiny_raw.iterdir() if p.is_dir())[1]
    truth = tiny_raw / name / f"{name}_seg.nii"
    perfect, empty = tmp_path / "perfect", tmp_path / "empty"
    perfect.mkdir()
    (perfect / f"{name}.nii").write_bytes(truth.read_bytes())
    seg = nib.load(truth)
    empty.mkdir()
    nib.save(nib.Nifti1Image(np.zeros(seg.shape, np.uint8), seg.affine), empty / f"{name}.nii.gz")
    for folder in (perfect, empty):
        evaluate.evaluate(hyperparameters.load(overrides={"prediction_dir": folder, "raw_data_dir": tiny_raw,
                                                          "run_dir": tmp_path / "run"}))
        assert f"wrote {folder / 'evaluation.csv'} and {folder / 'evaluation_boxplot.png'}" in capsys.readouterr().out
    dice = {}
    for folder in (perfect, empty):
        with open(folder / "evaluation.csv", newline="") as file:
            (row,) = csv.DictReader(file)
        dice[folder.name] = float(row["dice_WT"])
    assert dice == {"perfect": 1.0, "empty": 0.0}
    assert not (tmp_path / "run").exists()


def test_ground_truth_from_label_maps_and_case_folders_first_folder_first(tmp_path, tiny_raw):
    names = sorted(p.name for p in tiny_raw.iterdir() if p.is_dir())
    own = write_label_map(tmp_path / "maps" / f"{names[0]}.nii.gz", np.zeros((4, 4, 4)))
    truth = cases.find_ground_truth([tmp_path / "maps", tiny_raw, tmp_path / "missing"],
                                       ("flair", "t1", "t1ce", "t2"), "seg")
    assert sorted(truth) == names
    assert truth[names[0]] == own and truth[names[1]] == tiny_raw / names[1] / f"{names[1]}_seg.nii"


def test_summary_statistics_by_hand():
    rows = [{f"{m}_{r}": value for m in evaluation.METRICS for r in REGION_NAMES} for value in (0.0, 1.0, 2.0, 3.0)]
    summary = evaluation.summarize(rows)
    assert sorted(summary) == sorted(itertools.product(evaluation.SUMMARY_METRICS, REGION_NAMES))
    assert summary["dice", "ET"] == pytest.approx(
        {"mean": 1.5, "std": (5 / 3) ** 0.5, "median": 1.5, "25%": 0.75, "75%": 2.25})


def test_nothing_to_evaluate_says_why(tmp_path):
    (tmp_path / "pred").mkdir()
    with pytest.raises(CaseError, match="run predict.py first"):
        evaluation.evaluate_folders(tmp_path / "pred", tmp_path, ("flair",), "seg")
    write_label_map(tmp_path / "pred" / "BraTS20_Validation_001.nii.gz", np.zeros((4, 4, 4)))
    hp = hyperparameters.load(overrides={"prediction_dir": tmp_path / "pred", "raw_data_dir": tmp_path / "none",
                                         "run_dir": tmp_path / "run"})
    with pytest.raises(CaseError, match="no prediction could be evaluated"):
        evaluate.evaluate(hp)


def test_a_full_size_case_takes_under_2_s_of_cpu():
    files = sorted(REFERENCE_DIR.glob("*.nii.gz"))
    if len(files) < 2:
        pytest.skip("real reference segmentations not found in ../shared/data/brats_sample")
    start = time.process_time()  # CPU time of this process: not slowed down by other processes
    metrics = evaluation.evaluate_pair(files[0], files[1])
    assert time.process_time() - start < 2.0
    assert 0.5 < metrics["WT"]["dice"] < 1.0


def test_box_plot_explains_its_marks_and_shows_few_cases_as_points():
    from matplotlib.colors import to_rgb
    from bratsunet import evaluation, pictures
    rows = [{f"{metric}_{region}": value for metric in ("dice", "hd95") for region in ("WT", "TC", "ET")}
            for value in (0.2, 0.5, 0.7, 0.9)]
    figure = evaluation.box_figure(rows)
    key = [text.get_text() for text in figure.legends[0].get_texts()]
    assert key[:3] == ["box: 25th to 75th percentile", "line: median", "triangle: mean"] and key[-1] == "dot: one case"
    for axes in figure.axes:
        dots = [line for line in axes.lines if line.get_marker() == "." and line.get_linestyle() == "None"]
        assert sorted(len(line.get_ydata()) for line in dots) == [4, 4, 4]  # every case of every region
        boxes = [patch for patch in axes.patches]
        assert [to_rgb(box.get_edgecolor()) for box in boxes] == [pictures.REGION_COLORS[r] for r in ("WT", "TC", "ET")]
    many = evaluation.box_figure(rows * 10)  # 40 cases: the boxes alone
    assert "dot: one case" not in [text.get_text() for text in many.legends[0].get_texts()]
