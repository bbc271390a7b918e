"""BraTS metrics of predicted label maps against the ground truth -> evaluation.csv and a box plot beside them.

    python evaluate.py          # prediction_dir against the segmentations under raw_data_dir (and predict_input_dir)

Expected cases are those predict.py took: predict_input_dir's, or without it the test split of prepared_dir's
dataset.json (when prepared from this raw_data_dir). An expected case with ground truth but no prediction is
scored as BraTS scores it, a failure (Dice 0, HD95 373.13 mm, sensitivity and specificity 0 in every region);
predictions of other cases in prediction_dir (training or validation cases) are listed as ignored, not scored.

Per case and region (WT, TC, ET; RC for BraTS 2024): Dice, HD95 in mm (distance transforms of the surfaces, the
header's spacing), sensitivity, specificity and the volumes in mm^3 (loss.region_metrics), a row per case in
prediction_dir/evaluation.csv, beside the predictions it scores (as nnU-Net writes summary.json into the prediction
folder), so evaluating another prediction folder never replaces it; the printed summary gives mean, std (ddof 1),
median and quartiles as the BraTS leaderboard does.
Empty regions follow the BraTS rules: both empty -> Dice 1, HD95 0; one empty -> Dice 0, HD95 373.13 mm, so a
few false enhancing-tumor voxels in a case without one cost a whole Dice point (MONAI's DiceMetric gives NaN).

The ground truth is a folder of raw case folders (their segmentations; the modalities need not be there) or of
label maps {case}.nii[.gz]. A prediction without ground truth, on another grid, or that is the truth file itself
(a link) is listed as not evaluated; prediction_dir may not overlap the ground truth's folders.

lesion_wise: True adds the lesion-wise metrics BraTS ranks on since 2023, computed by the official package
brats-evaluation (configuration lesion_wise_task) as the challenge computes them; their columns keep the
package's names (lesionwise_dsc_mean_et, global_dsc_wt, ...), the metrics above stay the default.
"""
from bratsunet import settings_text
from bratsunet.cases import CaseError, check_apart, find_cases, find_ground_truth, label_convention, label_maps
from bratsunet.conventions import REGION_NAMES
from bratsunet.evaluation import (LESION_WISE_METRICS, STATISTICS, columns, evaluate_folders, ignored_predictions,
                                  missing_predictions, official_metrics, plot_boxes, statistics_of, summarize,
                                  write_csv)
from bratsunet.files import output_folder
from bratsunet.manifest import default_prediction_cases, read_manifest
from bratsunet.metrics import HD95_EMPTY

# What evaluate() reads: keys, and groups of hyperparameters.txt for all their keys (--help lists them).
SETTINGS = ("raw_data_dir", "prepared_dir", "run_dir", "prediction_dir", "predict_input_dir", "channel_names",
            "seg_channel_name", "data_format", "fold", "evaluation")


def expected_cases(hp):
    """(names, description) of the cases predict.py takes: predict_input_dir's (case folders or label maps), else
    dataset.json's default cases (the test split) when prepared from raw_data_dir; ((), None) when unknown."""
    try:
        if hp.predict_input_dir is not None:
            folder = hp.predict_input_dir
            names = set(find_ground_truth([folder], hp.channel_names, hp.seg_channel_name, data_format=hp.data_format))
            if not label_maps(folder):  # case folders, those without a segmentation too
                names |= {case.name for case in find_cases(folder, hp.channel_names, hp.seg_channel_name,
                                                           "predict_input_dir", hp.data_format, need_images=False)[0]}
            return sorted(names), f"the cases of {folder}"
        manifest = read_manifest(hp.prepared_dir)
    except (CaseError, FileNotFoundError, ValueError):
        return (), None
    if manifest["settings"].get("raw_data_dir") != str(hp.raw_data_dir):
        return (), None
    return default_prediction_cases(manifest, hp.fold)


def print_summary(rows, not_evaluated, regions=REGION_NAMES, missing=(), expected=None, ignored=()):
    print(f"\n{len(rows)} case(s) evaluated with the BraTS 2020 metrics (this project's; HD95 in mm; empty "
          "regions: both empty Dice 1, HD95 0, one empty Dice 0, HD95 373.13)"
          + f"\nthe cases expected: {expected}" * bool(expected))
    if ignored:
        more = f" (+{len(ignored) - 10} more)" if len(ignored) > 10 else ""
        print(f"ignored {len(ignored)} prediction(s) of other cases, not part of this result: "
              f"{', '.join(ignored[:10])}{more}")
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
            statistics = statistics_of([row[f"{metric}_{group}"] for row in official.values()])
            print(f"{metric:<22} {group:<6}" + "".join(f"{value:>9.4f}" for value in statistics.values()))


def evaluate(hp):
    """hp.prediction_dir against the ground truth under raw_data_dir (then predict_input_dir) -> rows;
    writes evaluation.csv and evaluation_boxplot.png into prediction_dir, beside the predictions they score, and
    prints the summary. With hp.lesion_wise the rows and the CSV also hold the official lesion-wise metrics."""
    check_apart(hp)
    if hp.prediction_dir.is_dir():  # the evaluation is written beside the predictions: checked before the work
        output_folder(hp.prediction_dir, "prediction_dir")
    truth_dirs = [folder for folder in (hp.raw_data_dir, hp.predict_input_dir) if folder is not None]
    data_format = label_convention(hp.data_format, truth_dirs)  # msd, nnunet: the labels of their dataset.json
    regions = data_format.regions
    expected, description = expected_cases(hp)
    rows, not_evaluated = evaluate_folders(hp.prediction_dir, truth_dirs, hp.channel_names, hp.seg_channel_name,
                                           data_format, expected=expected)
    if not rows:
        for name, reason in not_evaluated.items():
            print(f"  not evaluated {name}: {reason}")
        reasons = set(not_evaluated.values())  # one reason for all (no ground truth at all): said in the error
        raise CaseError(f"{hp.prediction_dir}: no prediction could be evaluated "
                        f"({reasons.pop() if len(reasons) == 1 else 'see above'})")
    missing = missing_predictions(rows, hp.prediction_dir)  # scored as failures
    official = official_metrics(hp, rows, truth_dirs, missing, data_format) if hp.lesion_wise else {}
    evaluated = [{**row, **official.get(row["case"], {})} for row in rows]
    official_columns = tuple(next(iter(official.values()), {}))
    table, plot = hp.prediction_dir / "evaluation.csv", hp.prediction_dir / "evaluation_boxplot.png"
    write_csv(evaluated, table, columns(regions) + official_columns)
    plot_boxes(rows, plot, regions)
    print_summary(rows, not_evaluated, regions, missing, description, ignored_predictions(hp.prediction_dir, expected))
    if official:
        print_lesion_wise_summary(official, hp.lesion_wise_task, missing)
    print(f"wrote {table} and {plot}, beside the predictions")
    return evaluated


def main():
    hp = settings_text.from_command_line(__doc__, SETTINGS)
    try:
        evaluate(hp)
    except (CaseError, OSError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
