"""k-fold cross-validation on one machine: every fold not trained yet, the cross-validation result over the
out-of-fold predictions, and the enhancing-tumor threshold tuned on them.

    python crossval.py                                   # num_folds, epochs, ... from hyperparameters.txt
    python crossval.py --hp hyperparameters_brats2020_gpu.txt

Which cases do what (the split is written once into dataset.json by prepare_dataset.py):
- fold K trains on the other folds; its validation cases give the curves (and checkpoint_best.pt), and at the end
  of the fold they are predicted with its final weights (checkpoint_final.pt, the last epoch, as nnU-Net does:
  no checkpoint chosen on the cases it is scored on) into run_dir/fold_K/validation/, whose predicted_with.json
  names the checkpoint (train.py does this at the end of every fold);
- together these out-of-fold predictions cover every labelled case outside the test split, each predicted by the
  one model that did not train on it: they give the cross-validation result (run_dir/crossval.csv, the printed
  summary, the number papers report, and crossval_boxplot.png) and tune the postprocessing
  (run_dir/postprocessing.json, and postprocessing.png: the mean ET Dice of every threshold tried);
- the test split plays no part here: predict.py (the ensemble of the folds) and evaluate.py report it.

The folds run one after another in this process (under torchrun: in one process group; process 0's disk decides
which folds to resume, all processes predict the out-of-fold cases, process 0 writes and evaluates them). Each
can also run on its own (`python train.py fold=K`, on another machine or under torchrun): this script then trains
only what is missing. A stopped fold resumes; a fold that has reached `epochs` is only checked against
dataset.json and its missing validation predictions made.

The threshold: nnU-Net's BraTS 2020 entry turned a predicted enhancing tumor smaller than a threshold into
necrosis (inference.postprocess_et) and chose the threshold on its cross-validation. Here every et_min_voxels from 0
to et_search_max is tried on the out-of-fold label maps; the smallest with the best mean ET Dice is written (0,
off, unless it helps). It moves voxels from ET to the tumor core only, so WT and TC do not change.
"""
import json
import os
import time

import numpy as np

from bratsunet import cases, conventions, devices, evaluation, inference, settings_text, training
from bratsunet.cases import CaseError
from bratsunet.files import atomic_write
from bratsunet.manifest import fold_cases, fold_dir, read_manifest, split_cases
from bratsunet.pictures import DPI

import train


# What crossval() reads: keys, and groups of hyperparameters.txt for all their keys (--help lists them).
SETTINGS = train.SETTINGS + ("raw_data_dir", "seg_channel_name", "et_search_max")


def train_folds(hp):
    """Train every fold that has not reached hp.epochs, one after another -> {fold: (train()'s result, seconds)}."""
    results = {}
    rank = devices.process_device(hp.device, training.PROCESS_GROUP_TIMEOUT)[0]  # under torchrun: the group, once
    for fold in range(hp.num_folds):
        if rank == 0:
            print(f"\n==== fold {fold} of {hp.num_folds} ====")
        start = time.perf_counter()
        resume = devices.on_rank0((fold_dir(hp, fold) / "checkpoint_last.pt").is_file)
        result = train.train(hp.replace(fold=fold, resume=resume))
        results[fold] = result, time.perf_counter() - start
    return results


def out_of_fold_rows(hp, manifest, data_format):
    """Every fold's validation predictions against the ground truth under raw_data_dir, label maps of data_format (a
    Convention) -> (rows with a "fold" column, {case: reason} of predictions not evaluated, cases without a
    prediction, scored as failures, {fold: the checkpoint that made its predictions})."""
    rows, not_evaluated, missing, sources = [], {}, [], {}
    for fold in range(hp.num_folds):
        folder = fold_dir(hp, fold) / "validation"
        names = split_cases(manifest, fold)[1]
        if not names:  # num_folds 1 with val_fraction 0
            continue
        record = folder / inference.VALIDATION_RECORD
        source = json.loads(record.read_text()) if record.is_file() else {}
        sources[f"fold_{fold}"] = f"{source.get('checkpoint', 'unknown')}, epoch {source.get('epoch', 'unknown')}"
        fold_rows, problems = evaluation.evaluate_folders(folder, [hp.raw_data_dir], hp.channel_names,
                                                        hp.seg_channel_name, data_format, expected=names)
        rows += [{"fold": fold, **row} for row in fold_rows]
        not_evaluated.update(problems)
        missing += evaluation.missing_predictions(fold_rows, folder)
    return rows, not_evaluated, missing, sources


def search_et_threshold(voxels, dice_kept, dice_removed, max_voxels):
    """(et_min_voxels in 0 .. max_voxels with the best mean ET Dice, the smallest of equals; the mean ET Dice of
    each). Per case: voxels of predicted ET, ET Dice as predicted, ET Dice with that ET made necrosis."""
    thresholds = np.arange(max_voxels + 1)[:, None]  # (T, 1)
    removed = (voxels[None] > 0) & (voxels[None] < thresholds)  # (T, N): postprocess_et's rule
    means = np.where(removed, dice_removed[None], dice_kept[None]).mean(axis=1)  # (T,)
    return int(np.argmax(means)), means  # argmax: the first of the best


def tune_et_threshold(hp, rows, data_format):
    """The ET threshold on the out-of-fold label maps (of data_format, a Convention) -> (et_min_voxels, mean ET Dice
    of every threshold tried, the rows with it applied)."""
    truth = cases.find_ground_truth([hp.raw_data_dir], hp.channel_names, hp.seg_channel_name,
                                    data_format=data_format)
    voxels, removed_rows = np.zeros(len(rows), np.int64), {}
    for index, row in enumerate(rows):
        path = fold_dir(hp, row["fold"]) / "validation" / f"{row['case']}.nii.gz"
        if not path.is_file():  # a failure: nothing predicted, nothing to remove
            continue
        voxels[index] = np.count_nonzero(cases.load_labels(path, data_format)[0] == 3)
        if 0 < voxels[index] < hp.et_search_max:  # the cases a threshold in the search can change
            metrics = evaluation.evaluate_pair(path, truth[row["case"]], data_format,
                                             lambda labels: inference.postprocess_et(labels, voxels[index] + 1))
            removed_rows[index] = {**row, **{f"{metric}_{region}": metrics[region][metric]
                                             for metric in evaluation.METRICS for region in metrics}}
    kept = np.array([row["dice_ET"] for row in rows])
    removed = np.array([removed_rows.get(i, row)["dice_ET"] for i, row in enumerate(rows)])
    best, means = search_et_threshold(voxels, kept, removed, hp.et_search_max)
    changed = [removed_rows[i] if 0 < voxels[i] < best else row for i, row in enumerate(rows)]
    return best, means, changed


def plot_threshold(means, best, path):
    """postprocessing.png: the out-of-fold mean ET Dice of every et_min_voxels tried, the chosen one marked."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend on a server or in tests
    figure = Figure((6, 3.5))
    axis = figure.subplots()
    axis.plot(np.arange(len(means)), means, label="mean ET Dice, out-of-fold")
    axis.axvline(best, color="k", linestyle="--", label=f"et_min_voxels {best}")
    axis.set(xlabel="et_min_voxels (voxels)", ylabel="mean ET Dice", title="enhancing-tumor threshold")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))


def summary_table(rows, rows_with, et_min_voxels):
    """Markdown rows: Dice and HD95 (mean, median) per region as predicted, and ET with et_min_voxels."""
    lines = ["| region | Dice mean | Dice median | HD95 mean (mm) | HD95 median (mm) |",
             "| --- | --- | --- | --- | --- |"]
    for label, region, table in [(r, r, rows) for r in conventions.REGION_NAMES] + [
            (f"ET, et_min_voxels {et_min_voxels}", "ET", rows_with)]:
        dice, hd95 = (np.array([row[f"{metric}_{region}"] for row in table]) for metric in ("dice", "hd95"))
        lines.append(f"| {label} | {dice.mean():.3f} | {np.median(dice):.3f} | {hd95.mean():.2f} | "
                     f"{np.median(hd95):.2f} |")
    return "\n".join(lines)


def crossval(hp):
    """Train the missing folds, then the cross-validation result and the ET threshold over the out-of-fold
    predictions: writes run_dir/crossval.csv and run_dir/postprocessing.json -> the postprocessing record."""
    manifest = read_manifest(hp.prepared_dir, hp.data_format)
    fold_cases(manifest, hp)  # dataset.json must hold hp.num_folds folds: say so before any training
    results = train_folds(hp)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun: the evaluation once, in the main process
        return None
    data_format = cases.label_convention(hp.data_format, [hp.raw_data_dir])  # msd, nnunet: their dataset.json's
    rows, not_evaluated, missing, sources = out_of_fold_rows(hp, manifest, data_format)
    if not rows:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in not_evaluated.items()) or "no validation cases"
        raise CaseError(f"{hp.run_dir}: no out-of-fold prediction could be evaluated ({reasons[:300]})")
    best, means, rows_with = tune_et_threshold(hp, rows, data_format)
    regions = data_format.regions
    evaluation.write_csv(rows, hp.run_dir / "crossval.csv", ("case", "fold") + evaluation.columns(regions)[1:])
    evaluation.plot_boxes(rows, hp.run_dir / "crossval_boxplot.png", regions)
    plot_threshold(means, best, hp.run_dir / "postprocessing.png")
    record = {"et_min_voxels": best, "mean_dice_ET": {"without": float(means[0]), "with": float(means[best])},
              "searched": f"0 .. {hp.et_search_max} voxels", "cases": len(rows), "num_folds": hp.num_folds,
              "tuned_on": "out-of-fold predictions in fold_K/validation (never the test split)",
              "out_of_fold_predictions_of": sources}  # crossval.csv's numbers come from these checkpoints
    atomic_write(hp.run_dir / "postprocessing.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1)))

    print(f"\n==== cross-validation: {len(rows)} out-of-fold case(s) of {hp.num_folds} fold(s) ====")
    for fold, (result, seconds) in results.items():
        best_dice = "none" if result["best_dice_mean"] is None else f"{result['best_dice_mean']:.3f}"
        print(f"fold {fold}: out-of-fold predictions of {sources.get(f'fold_{fold}', 'none')}; best validation "
              f"mean Dice {best_dice} (epoch {result['best_epoch']}), {seconds:.0f} s")
    print(summary_table(rows, rows_with, best))
    if missing:
        print(f"{len(missing)} case(s) without an out-of-fold prediction, scored as failures: {', '.join(missing)}")
    for name, reason in not_evaluated.items():
        print(f"  not evaluated {name}: {reason}")
    print(f"et_min_voxels {best}: mean ET Dice {means[0]:.4f} -> {means[best]:.4f}; wrote crossval.csv, "
          f"crossval_boxplot.png, postprocessing.json (predict.py applies it) and postprocessing.png in {hp.run_dir}")
    return record


def main():
    hp = settings_text.from_command_line(__doc__, SETTINGS)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        devices.run_torchrun_process(crossval, hp)  # ends the process
    try:
        crossval(hp)
    except (CaseError, OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
