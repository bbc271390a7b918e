"""Whole-volume inference: raw BraTS case folders -> label maps in the input's grid.

    python predict.py                                   # the test split of raw_data_dir, run_dir's final checkpoint(s)
    python predict.py predict_input_dir=data/BraTS2020_ValidationData tta_mirror=True
    python predict.py "checkpoint=runs/brats2020/fold_*/checkpoint_best.pt"   # an ensemble of the best ones

Each case goes through prepare_dataset.py's preprocessing (crop to the brain, z-score over the brain voxels),
the network runs window by window (sliding_window: overlapping windows, the last one flush with the far
border, outputs blended with Gaussian weights), probabilities become labels (ET inside TC inside WT), and the
labels go back into the full grid as prediction_dir/{case}.nii.gz: uint8 labels of the input's convention
(data_format: 0/1/2/4 for BraTS 2020 and 2021, 0/1/2/3 for 2023, 0/1/2/3/4 for 2024) with the input's affine and
header, ready for the BraTS portal. Modalities are found by meaning (a network trained on BraTS 2020's flair, t1,
t1ce, t2 reads 2023's t2f, t1n, t1c, t2w). A case outside the BraTS grid is skipped unless allow_any_grid: True;
a bad case is reported and skipped; cases with a prediction are skipped unless overwrite: True; prediction_dir may
not overlap raw_data_dir or predict_input_dir (its label maps would later be read as ground truth). The network and
the settings it was trained with (target, channel_names, patch_size as the window, crop_margin) come from the
checkpoint, not from hyperparameters.txt.

Ensembles: `checkpoint` may name several files (a comma list or a glob; empty: checkpoint_final.pt of run_dir,
or of every fold). Each network gives a case's probabilities (its own window, mirror TTA inside it); their mean
becomes the labels. The networks must agree on target, channel_names and crop_margin. The test split is refused
where a checkpoint of the ensemble trained or validated on one of its cases (the checkpoint holds its cases).

et_min_voxels (off with 0): a predicted enhancing tumor (ET) smaller than this becomes necrotic core (label 1),
since BraTS scores a single false ET voxel in a case without ET as Dice 0 (nnU-Net's BraTS 2020 entry did the
same). Empty: the value crossval.py tuned, from postprocessing.json beside the checkpoints (or in the run
folder above fold_K folders), if there is one.

save_probabilities: also prediction_dir/{case}_probabilities.npz, for averaging several models:
"probabilities" float16 (C, x, y, z) over the crop box only (outside it lies background, where no
window ran), "crop_box" ((start, stop) per axis in the full grid), "original_shape", and "channels"
(WT, TC, ET (, RC) for target regions, the label names for target labels). Average the files' probabilities,
then losses.probabilities_to_labels and inference.labels_in_input_grid give the ensemble's labels.
"""
from bratsunet import settings_text
from bratsunet.cases import CaseError, check_apart, find_cases
from bratsunet.checkpoints import load_checkpoint
from bratsunet.devices import resolve_device
from bratsunet.inference import checkpoint_paths, load_ensemble, predict_cases
from bratsunet.manifest import default_prediction_cases, holdout_cases, read_manifest

# What predict() reads: keys, and groups of hyperparameters.txt for all their keys (--help lists them).
SETTINGS = ("raw_data_dir", "prepared_dir", "run_dir", "prediction_dir", "seg_channel_name", "data_format",
            "allow_any_grid", "num_folds", "fold", "device", "precision", "channels_last", "checkpoint",
            "predict_input_dir", "sw_overlap", "sw_batch_size", "tta_mirror", "et_min_voxels", "save_probabilities",
            "overwrite", "backend")


def cases_to_predict(hp):
    """The cases of predict_input_dir, or (empty) the cases of raw_data_dir that no model trained on or was selected
    with: the test split of prepared_dir's manifest (see default_prediction_cases)."""
    if hp.predict_input_dir is not None:
        cases, problems = find_cases(hp.predict_input_dir, hp.channel_names, hp.seg_channel_name, "predict_input_dir",
                                     hp.data_format)
        for _, reason in problems:
            print(f"skipped {reason}")
        return cases
    manifest = read_manifest(hp.prepared_dir)
    names, description = default_prediction_cases(manifest, hp.fold)
    if holdout_cases(manifest):  # the test split: no checkpoint may have seen it
        refuse_seen_cases(names, checkpoint_paths(hp))
    print(f"predicting {len(names)} case(s): {description}")
    found = {case.name: case for case in
             find_cases(hp.raw_data_dir, hp.channel_names, hp.seg_channel_name, data_format=hp.data_format)[0]}
    missing = [name for name in names if name not in found]
    if missing:
        print(f"{len(missing)} case(s) of {hp.prepared_dir / 'dataset.json'} not found under {hp.raw_data_dir}: "
              f"{', '.join(missing[:5])}")
    return [found[name] for name in names if name in found]


def refuse_seen_cases(names, paths):
    """ValueError naming the checkpoint and the cases when a checkpoint trained or validated on a case of names
    (the test split): its scores there would not be a test result."""
    for path in paths:
        split = load_checkpoint(path).get("split") if path.suffix != ".onnx" and path.is_file() else None
        if split is None:
            print(f"{path}: no record of the cases it trained on; not checked against the test split")
            continue
        seen = sorted(set(names) & set(split["train"] + split["val"]))
        if seen:
            raise ValueError(f"{path} trained or validated on {len(seen)} case(s) of the test split of dataset.json "
                             f"({', '.join(seen[:5])}{', ...' * (len(seen) > 5)}): their scores would not be a test "
                             "result; predict with checkpoints of this dataset.json's folds, or name the cases in "
                             "predict_input_dir")


def predict(hp):
    """Predict the cases of hp (see cases_to_predict) with hp's checkpoint(s) -> paths of the label maps written."""
    check_apart(hp)  # label maps among the ground truth would be read as ground truth
    members, hp = load_ensemble(hp, resolve_device(hp.device))
    return predict_cases(hp, cases_to_predict(hp), members)


def main():
    hp = settings_text.from_command_line(__doc__, SETTINGS)
    try:
        predict(hp)
    except (CaseError, OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
