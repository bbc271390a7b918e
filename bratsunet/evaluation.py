"""Scoring label maps against the ground truth: per case and region (the BraTS metrics of metrics.py), folders of
predictions with missing cases scored as failures, summary statistics, the official lesion-wise metrics, the CSV
and the box plot. evaluate.py and crossval.py use it."""
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

from bratsunet.cases import CaseError, find_ground_truth, label_maps, load_labels
from bratsunet.console import progress_bar
from bratsunet.conventions import REGION_NAMES, convention, internal_to_brats
from bratsunet.files import archives_in, atomic_write
from bratsunet.metrics import HD95_EMPTY, METRICS, SUMMARY_METRICS, region_metrics
from bratsunet.pictures import DPI, REGION_COLORS

STATISTICS = ("mean", "std", "median", "25%", "75%")
LESION_WISE_METRICS = ("lesionwise_dsc_mean", "lesionwise_hd95_mean", "lesionwise_nsd_mean")  # summarized


def columns(regions=REGION_NAMES):
    return ("case",) + tuple(f"{metric}_{region}" for metric in METRICS for region in regions)


COLUMNS = columns()


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
    return region_metrics(pred, truth, spacing, convention(data_format).regions)


def failure_row(name, truth_path, data_format="brats2020"):
    """The row of a case with ground truth and no prediction, scored as BraTS scores a missing case: Dice 0,
    HD95 373.13 mm, sensitivity and specificity 0 in every region; nothing predicted."""
    truth, image = load_labels(truth_path, data_format)
    regions = convention(data_format).regions
    metrics = region_metrics(np.zeros_like(truth), truth, tuple(float(s) for s in image.header.get_zooms()[:3]),
                             regions)
    failed = {"dice": 0.0, "hd95": HD95_EMPTY, "sensitivity": 0.0, "specificity": 0.0}
    return {"case": name, **{f"{metric}_{region}": failed.get(metric, metrics[region][metric])
                             for metric in METRICS for region in regions}}


def evaluate_folders(pred_dir, truth_dirs, channel_names, seg_channel_name, data_format="brats2020", *, expected=()):
    """Label maps of pred_dir against the ground truth in truth_dirs (a folder or a list of them)
    -> (rows: one dict of columns(regions) per evaluated case, not_evaluated: {case: reason}).
    expected: the cases that should have a prediction; one with ground truth but none gets a failure_row, and the
    predictions of other cases (training or validation cases beside the test cases) are left out (ignored_predictions).
    """
    rows, not_evaluated = [], {}
    predictions = label_maps(pred_dir, not_evaluated)
    if not predictions and not not_evaluated:
        raise CaseError(f"{pred_dir}: no predictions ({{case}}.nii.gz files): run predict.py first")
    if expected:
        predictions = {name: path for name, path in predictions.items() if name in expected}
        not_evaluated = {name: reason for name, reason in not_evaluated.items() if name in expected}
    truth_dirs = [truth_dirs] if isinstance(truth_dirs, (str, Path)) else list(truth_dirs)
    unusable, regions = {}, convention(data_format).regions
    truth = find_ground_truth(truth_dirs, channel_names, seg_channel_name, unusable, data_format)
    searched = " or ".join(f"{folder}" + ("" if Path(folder).is_dir() else " (does not exist)")
                           + "".join(f" (it holds {name}: unpack it first)" for name in archives_in(folder)[:1])
                           for folder in truth_dirs)
    for name, path in progress_bar(predictions.items(), description="evaluate", unit="case"):
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
    for name in sorted(set(expected) - set(predictions) - set(not_evaluated)):
        if name not in truth:  # said, never dropped without a word
            not_evaluated[name] = unusable.get(name, f"no ground truth under {searched}") + " (nor a prediction)"
            continue
        try:
            rows.append(failure_row(name, truth[name], data_format))
        except CaseError as error:
            not_evaluated[name] = str(error)
    return sorted(rows, key=lambda row: row["case"]), not_evaluated


def ignored_predictions(pred_dir, expected):
    """The cases of pred_dir's label maps that are not expected (none when the expected cases are unknown)."""
    problems = {}
    return sorted({*label_maps(pred_dir, problems), *problems} - set(expected)) if expected else []


def missing_predictions(rows, pred_dir):
    """The cases of rows that have no label map in pred_dir: those scored as failures."""
    return sorted({row["case"] for row in rows} - set(label_maps(pred_dir)))


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
    for name, (pred_path, truth_path) in progress_bar(pairs.items(), description="lesion-wise", unit="case"):
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


def official_metrics(hp, rows, truth_dirs, missing, data_format):
    """lesion_wise_metrics of the cases of rows: those with a prediction, and those without (missing); label maps of
    data_format (a name, or the Convention cases.label_convention gives)."""
    predictions = label_maps(hp.prediction_dir)
    truth = find_ground_truth(truth_dirs, hp.channel_names, hp.seg_channel_name, data_format=data_format)
    pairs = {row["case"]: (predictions[row["case"]], truth[row["case"]]) for row in rows if row["case"] not in missing}
    return lesion_wise_metrics(pairs, missing, hp.lesion_wise_task, data_format)


def percentiles(values, quantiles):
    """np.percentile's linear interpolation of sorted values, where infinite values stay infinite: numpy's
    inf - inf makes the median of [1, inf, inf] NaN (with a RuntimeWarning), here it is inf."""
    position = np.asarray(quantiles, dtype=np.float64) / 100 * (len(values) - 1)
    below, above = values[np.floor(position).astype(int)], values[np.ceil(position).astype(int)]
    with np.errstate(invalid="ignore"):  # inf - inf, in the entries where below is taken
        between = below + (above - below) * (position - np.floor(position))
    return np.where((below == above) | (position == np.floor(position)), below, between)


def statistics_of(values):
    """mean, std (ddof 1), median, 25% and 75% of the finite or infinite values; NaN ones are left out. With an
    infinite value the mean and std are infinite, the quartiles where they fall."""
    values = np.sort(np.array(values, dtype=np.float64))
    values = values[~np.isnan(values)]
    if not len(values):
        return dict.fromkeys(STATISTICS, np.nan)
    q25, median, q75 = percentiles(values, [25, 50, 75])
    infinite = not np.isfinite(values).all()
    std = 0.0 if len(values) == 1 else np.inf if infinite else values.std(ddof=1)
    return dict(zip(STATISTICS, (values.mean(), std, median, q25, q75)))


def summarize(rows, regions=REGION_NAMES):
    """{(metric, region): {statistic: value}} over the cases, for the SUMMARY_METRICS."""
    return {(metric, region): statistics_of([row[f"{metric}_{region}"] for row in rows])
            for metric in SUMMARY_METRICS for region in regions}


def write_csv(rows, path, fieldnames=COLUMNS):
    def write(tmp):  # a case folder name that is not UTF-8 (surrogates) is written as \udcNN
        with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as file:
            writer = csv.DictWriter(file, fieldnames)
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, write)


FEW_CASES = 30  # up to this many cases a box plot also shows each case as a point


def box_figure(rows, regions=REGION_NAMES):
    """Box plots of Dice and HD95 per region over the cases, in the regions' colors, with a key to their marks;
    with few cases every case as a point too."""
    import matplotlib.figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    figure = matplotlib.figure.Figure(figsize=(9, 4.8))  # no pyplot: no GUI backend on a server or in tests
    points = len(rows) <= FEW_CASES
    for axis, metric, title in zip(figure.subplots(1, 2), ("dice", "hd95"), ("Dice", "HD95 (mm)")):
        values = [[row[f"{metric}_{region}"] for row in rows] for region in regions]
        boxes = axis.boxplot(values, tick_labels=regions, showmeans=True, patch_artist=True, widths=0.5,
                             medianprops={"color": "black"}, flierprops={"marker": "o", "markerfacecolor": "none"},
                             meanprops={"marker": "^", "markerfacecolor": "white", "markeredgecolor": "black"})
        for box, region in zip(boxes["boxes"], regions):
            box.set(facecolor=(*REGION_COLORS[region], 0.35), edgecolor=REGION_COLORS[region])
        if points:  # spread sideways by a fixed pattern (no randomness: the same picture every run)
            for i, column in enumerate(values, start=1):
                spread = 0.12 * (np.arange(len(column)) % 5 - 2) / 2
                axis.plot(i + spread, column, ".", color="black", alpha=0.6, markersize=5)
        axis.set(title=f"{title}, {len(rows)} cases", **({"ylim": (-0.02, 1.02)} if metric == "dice" else {}))
        axis.grid(alpha=0.3, axis="y")
    key = [Patch(facecolor="lightgrey", edgecolor="grey", label="box: 25th to 75th percentile"),
           Line2D([], [], color="black", label="line: median"),
           Line2D([], [], marker="^", color="black", markerfacecolor="white", linestyle="none", label="triangle: mean"),
           Line2D([], [], color="grey", label="whiskers: to the last case within 1.5 box lengths"),
           Line2D([], [], marker="o", color="grey", markerfacecolor="none", linestyle="none", label="circle: beyond")]
    if points:
        key.append(Line2D([], [], marker=".", color="black", linestyle="none", label="dot: one case"))
    figure.legend(handles=key, loc="lower center", ncol=3, frameon=False, fontsize=8)
    figure.tight_layout(rect=(0, 0.13, 1, 1))
    return figure


def plot_boxes(rows, path, regions=REGION_NAMES):
    figure = box_figure(rows, regions)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))
