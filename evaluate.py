"""BraTS metrics of predicted label maps against the ground truth -> evaluation.csv, a summary and a box plot.

    python evaluate.py          # prediction_dir against the segmentations under raw_data_dir (and predict_input_dir)

Which cases are expected: those predict.py took, i.e. the cases of predict_input_dir, or without it the test split
of prepared_dir's dataset.json (when prepared from this raw_data_dir). An expected case that has ground truth but
no prediction is scored as BraTS scores it, a failure: Dice 0 and HD95 373.13 mm in every region (sensitivity and
specificity 0), and is listed and counted in the summary.

Per case and region (WT, TC, ET): Dice, HD95 in mm (the voxel spacing from the NIfTI header),
sensitivity, specificity and the predicted and true volumes in mm^3 (loss.region_metrics), one row per
case in run_dir/evaluation.csv. The printed summary gives mean, standard deviation (over cases, ddof 1),
median and the 25th and 75th percentiles per region and metric, as the BraTS leaderboard does, and
run_dir/evaluation_boxplot.png shows the spread of Dice and HD95.

Empty regions follow the BraTS rules: both empty -> Dice 1 and HD95 0; only one empty -> Dice 0 and
HD95 373.13 mm. So a few false enhancing-tumor voxels in a case without enhancing tumor cost a whole
Dice point, as on the leaderboard (MONAI's DiceMetric gives NaN there and the case drops out of its mean).
HD95 comes from distance transforms of the two surfaces, not from pairwise point distances: a full
240 x 240 x 155 case takes well under 2 s on one core.

The ground truth is a folder of raw case folders (found like prepare_dataset.py finds them, the
*_seg file of each; the modalities need not be there) or a folder of label maps {case}.nii[.gz];
evaluate_folders compares any two such folders. A prediction without ground truth, or with another shape or
affine, is listed as not evaluated.
"""
import csv
from pathlib import Path

import numpy as np
from tqdm import tqdm

import hyperparameters
from conventions import REGION_NAMES, brats_to_internal
from dataset import default_prediction_cases
from loss import HD95_EMPTY, region_metrics
from prepare_dataset import CaseError, atomic_write, find_cases, load_nifti, no_segmentation, read_manifest

METRICS = ("dice", "hd95", "sensitivity", "specificity", "volume_pred", "volume_true")
SUMMARY_METRICS = ("dice", "hd95", "sensitivity", "specificity")
COLUMNS = ("case",) + tuple(f"{metric}_{region}" for metric in METRICS for region in REGION_NAMES)
STATISTICS = ("mean", "std", "median", "25%", "75%")


# ---------------------------------------------------------------- finding and reading label maps

def case_name(path):
    """{case}.nii.gz or {case}.nii -> case, None for other files and hidden (temporary) ones."""
    for suffix in (".nii.gz", ".nii"):
        if path.name.endswith(suffix) and not path.name.startswith("."):
            return path.name[: -len(suffix)]
    return None


def label_maps(folder):
    """{case: path} of the label maps directly in folder."""
    paths = sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []
    return {case_name(path): path for path in paths if path.is_file() and case_name(path)}


def modality_files(folder, channel_names):
    """The files of a case folder named as a modality: a message on a missing segmentation lists only the others."""
    return tuple(path for path in folder.iterdir()
                 if any((case_name(path) or "").lower().endswith("_" + channel.lower()) for channel in channel_names))


def find_ground_truth(folders, channel_names, seg_channel_name, reasons=None):
    """{case: segmentation path} from folders of label maps or of case folders, with or without their modalities
    (the first folder wins). reasons: a dict that gets why a case folder gives no segmentation (a misnamed file)."""
    truth = {}
    for folder in folders:
        found = label_maps(folder)
        if not found:
            try:
                cases, problems = find_cases(folder, (), seg_channel_name)  # the truth needs no modality
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


def load_labels(path):
    """(internal labels (X, Y, Z), nibabel image) of a label map with BraTS labels 0, 1, 2, 4."""
    array, image = load_nifti(path)
    try:
        return brats_to_internal(array), image
    except ValueError as error:
        raise CaseError(f"{path}: {error}") from None


def evaluate_pair(pred_path, truth_path, postprocess=None):
    """{region: {metric: value}} of one case (its prediction's internal labels passed through postprocess first,
    when given); CaseError naming both files when their grids differ."""
    pred, pred_image = load_labels(pred_path)
    pred = postprocess(pred) if postprocess else pred
    truth, truth_image = load_labels(truth_path)
    if pred.shape != truth.shape:
        raise CaseError(f"{pred_path}: shape {pred.shape} differs from the ground truth {truth_path} {truth.shape}")
    if not np.allclose(pred_image.affine, truth_image.affine, atol=1e-3):
        raise CaseError(f"{pred_path}: affine differs from the ground truth {truth_path} "
                        "(a prediction must be in its input's grid)")
    spacing = tuple(float(s) for s in truth_image.header.get_zooms()[:3])  # mm per voxel along x, y, z
    return region_metrics(pred, truth, spacing)


def failure_row(name, truth_path):
    """The row of a case with ground truth and no prediction, scored as BraTS scores a missing case: Dice 0,
    HD95 373.13 mm, sensitivity and specificity 0 in every region; nothing predicted."""
    truth, image = load_labels(truth_path)
    metrics = region_metrics(np.zeros_like(truth), truth, tuple(float(s) for s in image.header.get_zooms()[:3]))
    failed = {"dice": 0.0, "hd95": HD95_EMPTY, "sensitivity": 0.0, "specificity": 0.0}
    return {"case": name, **{f"{metric}_{region}": failed.get(metric, metrics[region][metric])
                             for metric in METRICS for region in REGION_NAMES}}


def evaluate_folders(pred_dir, truth_dirs, channel_names, seg_channel_name, *, expected=()):
    """Label maps of pred_dir against the ground truth in truth_dirs (a folder or a list of them)
    -> (rows: one dict of COLUMNS per evaluated case, not_evaluated: {case: reason}).
    expected: the cases that should have a prediction; one with ground truth but none gets a failure_row."""
    predictions = label_maps(pred_dir)
    if not predictions:
        raise CaseError(f"{pred_dir}: no predictions ({{case}}.nii.gz files): run predict.py first")
    truth_dirs = [truth_dirs] if isinstance(truth_dirs, (str, Path)) else list(truth_dirs)
    unusable = {}
    truth = find_ground_truth(truth_dirs, channel_names, seg_channel_name, unusable)
    searched = " or ".join(f"{folder}" + ("" if Path(folder).is_dir() else " (does not exist)")
                           for folder in truth_dirs)
    rows, not_evaluated = [], {}
    for name, path in tqdm(predictions.items(), desc="evaluate", unit="case"):
        if name not in truth:
            not_evaluated[name] = unusable.get(name, f"no ground truth under {searched}")
            continue
        try:
            metrics = evaluate_pair(path, truth[name])
        except CaseError as error:
            not_evaluated[name] = str(error)
            tqdm.write(f"skipped {name}: {error}")
            continue
        rows.append({"case": name, **{f"{metric}_{region}": metrics[region][metric]
                                      for metric in METRICS for region in REGION_NAMES}})
    for name in sorted(set(expected) & set(truth) - set(predictions)):
        try:
            rows.append(failure_row(name, truth[name]))
        except CaseError as error:
            not_evaluated[name] = str(error)
    return sorted(rows, key=lambda row: row["case"]), not_evaluated


def missing_predictions(rows, pred_dir):
    """The cases of rows that have no label map in pred_dir: those scored as failures."""
    return sorted({row["case"] for row in rows} - set(label_maps(pred_dir)))


def expected_cases(hp):
    """(names, description) of the cases predict.py takes: those of predict_input_dir, else its default cases of
    prepared_dir's dataset.json (the test split) when prepared from raw_data_dir; ((), None) when unknown."""
    try:
        if hp.predict_input_dir is not None:
            cases, _ = find_cases(hp.predict_input_dir, hp.channel_names, hp.seg_channel_name, "predict_input_dir")
            return [case.name for case in cases], f"the cases of {hp.predict_input_dir}"
        manifest = read_manifest(hp.prepared_dir)
    except (CaseError, FileNotFoundError, ValueError):
        return (), None
    if manifest["settings"].get("raw_data_dir") != str(hp.raw_data_dir):
        return (), None
    return default_prediction_cases(manifest, hp.fold)


# ---------------------------------------------------------------- outputs

def summarize(rows):
    """{(metric, region): {statistic: value}} over the cases, for the SUMMARY_METRICS."""
    summary = {}
    for metric in SUMMARY_METRICS:
        for region in REGION_NAMES:
            values = np.array([row[f"{metric}_{region}"] for row in rows], dtype=np.float64)
            q25, median, q75 = np.percentile(values, [25, 50, 75])
            std = values.std(ddof=1) if len(values) > 1 else 0.0
            summary[metric, region] = dict(zip(STATISTICS, (values.mean(), std, median, q25, q75)))
    return summary


def print_summary(rows, not_evaluated, missing=(), expected=None):
    print(f"\n{len(rows)} case(s) evaluated{f' ({expected})' if expected else ''}; HD95 in mm")
    print(f"{'metric':<12} {'region':<6}" + "".join(f"{name:>9}" for name in STATISTICS))
    for (metric, region), statistics in summarize(rows).items():
        print(f"{metric:<12} {region:<6}" + "".join(f"{value:>9.4f}" for value in statistics.values()))
    empty = ", ".join(f"{region} {sum(row[f'volume_true_{region}'] == 0 for row in rows)} / "
                      f"{sum(row[f'volume_pred_{region}'] == 0 for row in rows)}" for region in REGION_NAMES)
    print(f"cases with an empty region, ground truth / prediction: {empty}")
    if missing:
        print(f"{len(missing)} case(s) without a prediction, scored as failures (Dice 0, HD95 {HD95_EMPTY} mm): "
              + ", ".join(missing))
    for name, reason in not_evaluated.items():
        print(f"  not evaluated {name}: {reason}")


def write_csv(rows, path, columns=COLUMNS):
    def write(tmp):
        with open(tmp, "w", newline="") as file:
            writer = csv.DictWriter(file, columns)
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, write)


def plot_boxes(rows, path):
    """Box plots of Dice and HD95 per region over the cases."""
    import matplotlib.figure
    figure = matplotlib.figure.Figure(figsize=(9, 4))  # no pyplot: no GUI backend on a server or in tests
    for axis, metric, title in zip(figure.subplots(1, 2), ("dice", "hd95"), ("Dice", "HD95 (mm)")):
        values = [[row[f"{metric}_{region}"] for row in rows] for region in REGION_NAMES]
        axis.boxplot(values, tick_labels=REGION_NAMES, showmeans=True)
        axis.set(title=f"{title}, {len(rows)} cases", **({"ylim": (-0.02, 1.02)} if metric == "dice" else {}))
        axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def evaluate(hp):
    """hp.prediction_dir against the ground truth under raw_data_dir (then predict_input_dir) -> rows;
    writes run_dir/evaluation.csv and run_dir/evaluation_boxplot.png and prints the summary."""
    truth_dirs = [folder for folder in (hp.raw_data_dir, hp.predict_input_dir) if folder is not None]
    expected, description = expected_cases(hp)
    rows, not_evaluated = evaluate_folders(hp.prediction_dir, truth_dirs, hp.channel_names, hp.seg_channel_name,
                                           expected=expected)
    if not rows:
        for name, reason in not_evaluated.items():
            print(f"  not evaluated {name}: {reason}")
        reasons = set(not_evaluated.values())  # one reason for all (no ground truth at all): said in the error
        raise CaseError(f"{hp.prediction_dir}: no prediction could be evaluated "
                        f"({reasons.pop() if len(reasons) == 1 else 'see above'})")
    try:
        hp.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CaseError(f"{hp.run_dir}: cannot create run_dir ({error.strerror})") from None
    write_csv(rows, hp.run_dir / "evaluation.csv")
    plot_boxes(rows, hp.run_dir / "evaluation_boxplot.png")
    print_summary(rows, not_evaluated, missing_predictions(rows, hp.prediction_dir), description)
    print(f"wrote {hp.run_dir / 'evaluation.csv'} and {hp.run_dir / 'evaluation_boxplot.png'}")
    return rows


def main():
    hp = hyperparameters.from_command_line()
    try:
        evaluate(hp)
    except (CaseError, OSError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
