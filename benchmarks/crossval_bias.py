"""How optimistic the cross-validation result is when each fold's checkpoint is chosen on the cases it is scored
on: after crossval.py, every fold's validation cases are predicted again with its checkpoint_best.pt (the best
validation Dice of the epochs) into run_dir/fold_K/best/validation, and both sets of out-of-fold predictions are
scored against the ground truth, the final checkpoints' as crossval.csv scores them.
    python crossval.py num_folds=3 ...                        # first: the folds and their final checkpoints
    python benchmarks/crossval_bias.py num_folds=3 ...         # the same settings
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bratsunet import cases, checkpoints, evaluation, hyperparameters, inference
from bratsunet.conventions import REGION_NAMES
from bratsunet.devices import resolve_device
from bratsunet.manifest import fold_dir, read_manifest, split_cases


def out_of_fold_scores(hp, manifest, folder_of):
    """Mean Dice and HD95 per region over every fold's validation cases, predicted into folder_of(fold)."""
    rows, convention = [], cases.label_convention(hp.data_format, [hp.raw_data_dir])
    for fold in range(hp.num_folds):
        names = split_cases(manifest, fold)[1]
        rows += evaluation.evaluate_folders(folder_of(fold), [hp.raw_data_dir], hp.channel_names, hp.seg_channel_name,
                                            convention, expected=names)[0]
    return {f"{metric}_{region}": float(np.mean([row[f"{metric}_{region}"] for row in rows]))
            for metric in ("dice", "hd95") for region in REGION_NAMES}, len(rows)


def main():
    hp = hyperparameters.from_command_line()
    manifest, device = read_manifest(hp.prepared_dir, hp.data_format), resolve_device(hp.device)
    epochs = {}
    for fold in range(hp.num_folds):
        run = hp.replace(fold=fold, run_dir=fold_dir(hp, fold))
        net, checkpoint = checkpoints.load_model(run.run_dir / "checkpoint_best.pt", device)
        epochs[fold] = checkpoint["epoch"]
        inference.predict_validation(run.replace(run_dir=run.run_dir / "best"), split_cases(manifest, fold)[1], net,
                                     checkpoint["epoch"])
    final, cases = out_of_fold_scores(hp, manifest, lambda fold: fold_dir(hp, fold) / "validation")
    best, _ = out_of_fold_scores(hp, manifest, lambda fold: fold_dir(hp, fold) / "best" / "validation")
    print(f"\n{cases} out-of-fold cases of {hp.num_folds} folds; checkpoint_best.pt of epochs "
          f"{', '.join(str(epochs[fold]) for fold in sorted(epochs))} of {hp.epochs}; mean over the cases\n")
    print("| out-of-fold predictions of | " + " | ".join(f"Dice {r}" for r in REGION_NAMES) + " | Dice mean | "
          + " | ".join(f"HD95 {r} (mm)" for r in REGION_NAMES) + " |")
    print("| --- " * 8 + "|")
    for label, values in (("checkpoint_final.pt (crossval.csv)", final), ("checkpoint_best.pt", best)):
        dice = [values[f"dice_{r}"] for r in REGION_NAMES]
        print(f"| {label} | " + " | ".join(f"{d:.3f}" for d in dice) + f" | {np.mean(dice):.3f} | "
              + " | ".join(f"{values[f'hd95_{r}']:.2f}" for r in REGION_NAMES) + " |")


if __name__ == "__main__":
    main()
