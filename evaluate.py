"""BraTS metrics of predicted label maps against the ground truth -> evaluation.csv, a summary and a box plot.

    python evaluate.py          # prediction_dir against the segmentations under raw_data_dir (and predict_input_dir)

Expected cases are those predict.py took: predict_input_dir's, or without it the test split of prepared_dir's
dataset.json (when prepared from this raw_data_dir). An expected case with ground truth but no prediction is
scored as BraTS scores it, a failure (Dice 0, HD95 373.13 mm, sensitivity and specificity 0 in every region).

Per case and region (WT, TC, ET; RC for BraTS 2024): Dice, HD95 in mm (distance transforms of the surfaces, the
header's spacing), sensitivity, specificity and the volumes in mm^3 (loss.region_metrics), a row per case in
run_dir/evaluation.csv; the summary gives mean, std (ddof 1), median and quartiles as the BraTS leaderboard does.
Empty regions follow the BraTS rules: both empty -> Dice 1, HD95 0; one empty -> Dice 0, HD95 373.13 mm, so a
few false enhancing-tumor voxels in a case without one cost a whole Dice point (MONAI's DiceMetric gives NaN).

The ground truth is a folder of raw case folders (their segmentations; the modalities need not be there) or of
label maps {case}.nii[.gz]. A prediction without ground truth, on another grid, or that is the truth file itself
(a link) is listed as not evaluated; prediction_dir may not overlap the ground truth's folders.

lesion_wise: True adds the lesion-wise metrics BraTS ranks on since 2023, computed by the official package
brats-evaluation (configuration lesion_wise_task) as the challenge computes them; their columns keep the
package's names (lesionwise_dsc_mean_et, global_dsc_wt, ...), the metrics above stay the default.
"""
import contextlib
import csv
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

import hyperparameters
from conventions import CONVENTIONS, REGION_NAMES, brats_to_internal, internal_to_brats
from dataset import default_prediction_cases
from files import output_folder
from loss import HD95_EMPTY, region_metrics
from prepare_dataset import CaseError, atomic_write, find_cases, load_nifti, no_segmentation, read_manifest

METRICS = ("dice", "hd95", "sensitivity", "specificity", "volume_pred", "volume_true")
SUMMARY_METRICS = ("dice", "hd95", "sensitivity", "specificity")
STATISTICS = ("mean", "std", "median", "25%", "75%")
LESION_WISE_METRICS = ("lesionwise_dsc_mean", "lesionwise_hd95_mean", "lesionwise_nsd_mean")  # summarized


def columns(regions=REGION_NAMES):
    return ("case",) + tuple(f"{metric}_{region}" for metric in METRICS for region in regions)


COLUMNS = columns()


# ---------------------------------------------------------------- finding and reading label maps

def case_name(path):
    """{case}.nii.gz or {case}.nii -> case, None for other files and hidden (temporary) ones."""
    for suffix in (".nii.gz", ".nii"):
        if path.name.endswith(suffix) and not path.name.startswith("."):
            return path.name[: -len(suffix)]
    return None


def label_maps(folder, problems=None):
    """{case: path} of the label maps directly in folder. A case with both {case}.nii and {case}.nii.gz is
    left out, with the reason in problems ({case: reason}): which one is meant is not ours to guess."""
    found = {}
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        if path.is_file() and case_name(path):
            found.setdefault(case_name(path), []).append(path)
    if problems is not None:
        problems.update({name: f"{paths[0]}: both {paths[0].name} and {paths[1].name}; remove one"
                         for name, paths in found.items() if len(paths) > 1})
    return {name: paths[0] for name, paths in found.items() if len(paths) == 1}


def modality_files(folder, channel_names):
    """The files of a case folder named as a modality: a message on a missing segmentation lists only the others."""
    return tuple(path for path in folder.iterdir()
                 if any((case_name(path) or "").lower().endswith(channel.lower()) for channel in channel_names))


def find_ground_truth(folders, channel_names, seg_channel_name, reasons=None, data_format="brats2020"):
    """{case: segmentation path} from folders of label maps or of case folders, with or without their modalities
    (the first folder wins). reasons: a dict that gets why a case folder gives no segmentation (a misnamed file)."""
    truth = {}
    for folder in folders:
        found = label_maps(folder, reasons)
        if not found:
            try:  # the truth needs no modality
                cases, problems = find_cases(folder, (), seg_channel_name, data_format=data_format)
            except CaseError:  # missing or holding no cases: the other folders may have them
                continue
            found = {case.name: case.seg_path for case in cases if case.seg_path is not None}
            if reasons is not None:
                reasons.update({Path(path).name: reason for path, reason in problems})
                reasons.update({case.name: no_segmentation(case._replace(image_paths=modality_files(
                    case.folder, channel_names)), seg_channel_name) for case in cases if case.seg_path is None})
        for name, path in found.items():
            truth.setdefault(name, path)
    return truth


def load_labels(path, data_format="brats2020"):
    """(internal labels (X, Y, Z), nibabel image) of a label map with the labels of data_format (2020: 0, 1, 2, 4)."""
    array, image = load_nifti(path)
    try:
        return brats_to_internal(array, data_format), image
    except ValueError as error:
        raise CaseError(f"{path}: {error}") from None


def prediction_path(prediction_dir, name):
    """The label map of case name in prediction_dir, or None; CaseError when both .nii and .nii.gz are there."""
    problems = {}
    path = label_maps(prediction_dir, problems).get(name)
    if name in problems:
        raise CaseError(problems[name])
    return path


def first_predicted_case(prediction_dir):
    """The first case name of prediction_dir's label maps (rendering's default case); CaseError when there is none."""
    problems = {}
    names = sorted([*label_maps(prediction_dir, problems), *problems])
    if not names:
        raise CaseError(f"{prediction_dir}: no predictions (*.nii.gz): run predict.py or set rendering_sample_name")
    return names[0]


def evaluate_pair(pred_path, truth_path, data_format="brats2020", postprocess=None):
    """{region: {metric: value}} of one case (its prediction's internal labels passed through postprocess first,
    when given); CaseError naming both files when their grids differ."""
    if os.path.samefile(pred_path, truth_path):
        raise CaseError(f"{pred_path}: is the ground truth {truth_path} itself (a link), not a prediction")
    pred, pred_image = load_labels(pred_path, data_format)
    pred = postprocess(pred) if postprocess else pred
    truth, truth_image = load_labels(truth_path, data_format)
    if pred.shape != truth.shape:
        raise CaseError(f"{pred_path}: shape {pred.shape} differs from the ground truth {truth_path} {truth.shape}")
    if not np.allclose(pred_image.affine, truth_image.affine, atol=1e-3):
        raise CaseError(f"{pred_path}: affine differs from the ground truth {truth_path} "
                        "(a prediction must be in its input's grid)")
    spacing = tuple(float(s) for s in truth_image.header.get_zooms()[:3])  # mm per voxel along x, y, z
    return region_metrics(pred, truth, spacing, CONVENTIONS[data_format].regions)


def failure_row(name, truth_path, data_format="brats2020"):
    """The row of a case with ground truth and no prediction, scored as BraTS scores a missing case: Dice 0,
    HD95 373.13 mm, sensitivity and specificity 0 in every region; nothing predicted."""
    truth, image = load_labels(truth_path, data_format)
    regions = CONVENTIONS[data_format].regions
    metrics = region_metrics(np.zeros_like(truth), truth, tuple(float(s) for s in image.header.get_zooms()[:3]),
                             regions)
    failed = {"dice": 0.0, "hd95": HD95_EMPTY, "sensitivity": 0.0, "specificity": 0.0}
    return {"case": name, **{f"{metric}_{region}": failed.get(metric, metrics[region][metric])
                             for metric in METRICS for region in regions}}


def evaluate_folders(pred_dir, truth_dirs, channel_names, seg_channel_name, data_format="brats2020", *, expected=()):
    """Label maps of pred_dir against the ground truth in truth_dirs (a folder or a list of them)
    -> (rows: one dict of columns(regions) per evaluated case, not_evaluated: {case: reason}).
    expected: the cases that should have a prediction; one with ground truth but none gets a failure_row."""
    rows, not_evaluated = [], {}
    predictions = label_maps(pred_dir, not_evaluated)
    if not predictions and not not_evaluated:
        raise CaseError(f"{pred_dir}: no predictions ({{case}}.nii.gz files): run predict.py first")
    truth_dirs = [truth_dirs] if isinstance(truth_dirs, (str, Path)) else list(truth_dirs)
    unusable, regions = {}, CONVENTIONS[data_format].regions
    truth = find_ground_truth(truth_dirs, channel_names, seg_channel_name, unusable, data_format)
    searched = " or ".join(f"{folder}" + ("" if Path(folder).is_dir() else " (does not exist)")
                           for folder in truth_dirs)
    for name, path in tqdm(predictions.items(), desc="evaluate", unit="case"):
        if name not in truth:
            not_evaluated[name] = unusable.get(name, f"no ground truth under {searched}")
            continue
        try:
            metrics = evaluate_pair(path, truth[name], data_format)
        except CaseError as error:
            not_evaluated[name] = str(error)
            tqdm.write(f"skipped {name}: {error}")
            continue
        rows.append({"case": name, **{f"{metric}_{region}": metrics[region][metric]
                                      for metric in METRICS for region in regions}})
    for name in sorted(set(expected) & set(truth) - set(predictions) - set(not_evaluated)):
        try:
            rows.append(failure_row(name, truth[name], data_format))
        except CaseError as error:
            not_evaluated[name] = str(error)
    return sorted(rows, key=lambda row: row["case"]), not_evaluated


def missing_predictions(rows, pred_dir):
    """The cases of rows that have no label map in pred_dir: those scored as failures."""
    return sorted({row["case"] for row in rows} - set(label_maps(pred_dir)))


def expected_cases(hp):
    """(names, description) of the cases predict.py takes: predict_input_dir's (case folders or label maps), else
    dataset.json's default cases (the test split) when prepared from raw_data_dir; ((), None) when unknown."""
    try:
        if hp.predict_input_dir is not None:
            folder = hp.predict_input_dir
            names = set(find_ground_truth([folder], (), hp.seg_channel_name, data_format=hp.data_format))
            names |= {case.name for case in find_cases(folder, (), hp.seg_channel_name, "predict_input_dir",
                                                       hp.data_format)[0]}
            return sorted(names), f"the cases of {folder}"
        manifest = read_manifest(hp.prepared_dir)
    except (CaseError, FileNotFoundError, ValueError):
        return (), None
    if manifest["settings"].get("raw_data_dir") != str(hp.raw_data_dir):
        return (), None
    return default_prediction_cases(manifest, hp.fold)


# ---------------------------------------------------------------- lesion-wise metrics (the official package)

@contextlib.contextmanager
def _quiet():
    """The package prints its progress, a citation request and warnings: kept out of the summary."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _official_labels(path, data_format):
    """A label map in the values the package's configurations use (BraTS 2024: 1 NETC, 2 SNFH, 3 ET, 4 RC)."""
    labels, image = load_labels(path, data_format)
    return nib.Nifti1Image(internal_to_brats(labels, "brats2024"), image.affine)  # spacing from the affine


def lesion_wise_metrics(pairs, missing, task, data_format="brats2020"):
    """{case: {column: value}} of the BraTS lesion-wise metrics, as the official package computes them.

    pairs: {case: (prediction path, truth path)}; missing: cases without a prediction, which get the package's
    penalty. task: the package's configuration (gli, mets, MenPre, GoAT). The package's evaluation and its own
    parser (parse_seg_results, which writes a CSV) give the numbers; a case it cannot evaluate is left out."""
    try:
        import brats_evaluation
        from panoptica import Panoptica_Evaluator
    except ImportError:
        raise CaseError("lesion_wise: True needs the official BraTS evaluation package: "
                        "pip install brats-evaluation") from None
    with _quiet():
        evaluator = Panoptica_Evaluator.load_from_config(brats_evaluation.config_path(task))
    results = []
    for name, (pred_path, truth_path) in tqdm(pairs.items(), desc="lesion-wise", unit="case"):
        pred, truth = _official_labels(pred_path, data_format), _official_labels(truth_path, data_format)
        with _quiet():
            results.append(brats_evaluation.evaluate_single_exam(pred, truth, name, evaluator))
    with tempfile.TemporaryDirectory() as folder, _quiet():
        summary, table = Path(folder) / "summary.json", Path(folder) / "metrics.csv"
        summary.write_text(json.dumps({"metrics": results, "missings": list(missing)}))
        brats_evaluation.parse_seg_results(str(summary), str(table))
        rows = list(csv.DictReader(table.open(newline=""))) if table.is_file() else []
    cases = set(pairs) | set(missing)  # the parser adds rows of means, standard deviations and medians
    return {row.pop("subject_id"): {key: float(value) if value else np.nan for key, value in row.items()}
            for row in rows if row["subject_id"] in cases}


def official_metrics(hp, rows, truth_dirs, missing):
    """lesion_wise_metrics of the cases of rows: those with a prediction, and those without (missing)."""
    predictions = label_maps(hp.prediction_dir)
    truth = find_ground_truth(truth_dirs, hp.channel_names, hp.seg_channel_name, data_format=hp.data_format)
    pairs = {row["case"]: (predictions[row["case"]], truth[row["case"]]) for row in rows if row["case"] not in missing}
    return lesion_wise_metrics(pairs, missing, hp.lesion_wise_task, hp.data_format)


# ---------------------------------------------------------------- outputs

def _statistics(values):
    """mean, std (ddof 1), median, 25% and 75% of the finite or infinite values; NaN ones are left out."""
    values = np.array(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return dict.fromkeys(STATISTICS, np.nan)
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return dict(zip(STATISTICS, (values.mean(), std, median, q25, q75)))


def summarize(rows, regions=REGION_NAMES):
    """{(metric, region): {statistic: value}} over the cases, for the SUMMARY_METRICS."""
    return {(metric, region): _statistics([row[f"{metric}_{region}"] for row in rows])
            for metric in SUMMARY_METRICS for region in regions}


def print_summary(rows, not_evaluated, regions=REGION_NAMES, missing=(), expected=None):
    print(f"\n{len(rows)} case(s) evaluated with the BraTS 2020 metrics (this project's; HD95 in mm; empty "
          "regions: both empty Dice 1, HD95 0, one empty Dice 0, HD95 373.13)"
          + f"\nthe cases expected: {expected}" * bool(expected))
    print(f"{'metric':<12} {'region':<6}" + "".join(f"{name:>9}" for name in STATISTICS))
    for (metric, region), statistics in summarize(rows, regions).items():
        print(f"{metric:<12} {region:<6}" + "".join(f"{value:>9.4f}" for value in statistics.values()))
    empty = ", ".join(f"{region} {sum(row[f'volume_true_{region}'] == 0 for row in rows)} / "
                      f"{sum(row[f'volume_pred_{region}'] == 0 for row in rows)}" for region in regions)
    print(f"cases with an empty region, ground truth / prediction: {empty}")
    if missing:
        print(f"{len(missing)} case(s) without a prediction, scored as failures (Dice 0, HD95 {HD95_EMPTY} mm): "
              + ", ".join(missing))
    for name, reason in not_evaluated.items():
        print(f"  not evaluated {name}: {reason}")


def print_lesion_wise_summary(official, task, missing):
    from importlib.metadata import version
    groups = [key.rsplit("_", 1)[1] for key in next(iter(official.values()), {}) if key.startswith("global_dsc_")]
    print(f"\nlesion-wise metrics of the official package brats-evaluation {version('brats-evaluation')} "
          f"(configuration {task}), {len(official)} case(s), {len(missing)} without a prediction (the package's "
          "penalty); NaN (no lesion in truth and prediction) left out")
    print(f"{'metric':<22} {'region':<6}" + "".join(f"{name:>9}" for name in STATISTICS))
    for metric in LESION_WISE_METRICS:
        for group in groups:
            statistics = _statistics([row[f"{metric}_{group}"] for row in official.values()])
            print(f"{metric:<22} {group:<6}" + "".join(f"{value:>9.4f}" for value in statistics.values()))


def write_csv(rows, path, fieldnames=COLUMNS):
    def write(tmp):  # a case folder name that is not UTF-8 (surrogates) is written as \udcNN
        with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as file:
            writer = csv.DictWriter(file, fieldnames)
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, write)


def plot_boxes(rows, path, regions=REGION_NAMES):
    """Box plots of Dice and HD95 per region over the cases."""
    import matplotlib.figure
    figure = matplotlib.figure.Figure(figsize=(9, 4))  # no pyplot: no GUI backend on a server or in tests
    for axis, metric, title in zip(figure.subplots(1, 2), ("dice", "hd95"), ("Dice", "HD95 (mm)")):
        values = [[row[f"{metric}_{region}"] for row in rows] for region in regions]
        axis.boxplot(values, tick_labels=regions, showmeans=True)
        axis.set(title=f"{title}, {len(rows)} cases", **({"ylim": (-0.02, 1.02)} if metric == "dice" else {}))
        axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def same_or_inside(inner, outer):
    """True when folder inner is folder outer or lies inside it, however either is reached (links, letter case)."""
    inner = Path(inner).resolve()
    return Path(outer).exists() and any(
        folder.exists() and os.path.samefile(folder, outer) for folder in (inner, *inner.parents))


def check_apart(hp):
    """CaseError naming both settings when prediction_dir overlaps a folder of the ground truth: the
    predictions would be read as the ground truth, and score perfectly."""
    for setting in ("raw_data_dir", "predict_input_dir"):
        truth = getattr(hp, setting)
        if truth is not None and (same_or_inside(hp.prediction_dir, truth) or same_or_inside(truth, hp.prediction_dir)):
            raise CaseError(f"prediction_dir {hp.prediction_dir} and {setting} {truth} overlap: predictions and "
                            "ground truth must be in separate folders")


def evaluate(hp):
    """hp.prediction_dir against the ground truth under raw_data_dir (then predict_input_dir) -> rows;
    writes run_dir/evaluation.csv and run_dir/evaluation_boxplot.png and prints the summary. With
    hp.lesion_wise the rows and the CSV also hold the official lesion-wise metrics."""
    check_apart(hp)
    output_folder(hp.run_dir, "run_dir")
    truth_dirs = [folder for folder in (hp.raw_data_dir, hp.predict_input_dir) if folder is not None]
    regions = CONVENTIONS[hp.data_format].regions
    expected, description = expected_cases(hp)
    rows, not_evaluated = evaluate_folders(hp.prediction_dir, truth_dirs, hp.channel_names, hp.seg_channel_name,
                                           hp.data_format, expected=expected)
    if not rows:
        for name, reason in not_evaluated.items():
            print(f"  not evaluated {name}: {reason}")
        reasons = set(not_evaluated.values())  # one reason for all (no ground truth at all): said in the error
        raise CaseError(f"{hp.prediction_dir}: no prediction could be evaluated "
                        f"({reasons.pop() if len(reasons) == 1 else 'see above'})")
    missing = missing_predictions(rows, hp.prediction_dir)  # scored as failures
    official = official_metrics(hp, rows, truth_dirs, missing) if hp.lesion_wise else {}
    evaluated = [{**row, **official.get(row["case"], {})} for row in rows]
    official_columns = tuple(next(iter(official.values()), {}))
    write_csv(evaluated, hp.run_dir / "evaluation.csv", columns(regions) + official_columns)
    plot_boxes(rows, hp.run_dir / "evaluation_boxplot.png", regions)
    print_summary(rows, not_evaluated, regions, missing, description)
    if official:
        print_lesion_wise_summary(official, hp.lesion_wise_task, missing)
    print(f"wrote {hp.run_dir / 'evaluation.csv'} and {hp.run_dir / 'evaluation_boxplot.png'}")
    return evaluated


def main():
    hp = hyperparameters.from_command_line()
    try:
        evaluate(hp)
    except (CaseError, OSError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
