"""dataset.json, the manifest of a prepared folder: reading it, the split of its cases into the test split and the
folds, the folder of each fold's run, and the checks that settings match the prepared arrays."""
import json
from pathlib import Path

import numpy as np

from bratsunet import conventions
from bratsunet.cases import CaseError

MANIFEST = "dataset.json"
FORMAT_VERSION = 1  # bump when the prepared arrays change meaning, so old ones are redone
SPLIT_SETTINGS = ("seed", "test_fraction", "num_folds", "val_fraction")


def split_cases(manifest, fold=0):
    """(train_names, val_names) of a fold, sorted: fold K validates on the "val" cases of fold K and trains on
    the other labelled cases outside the test split. The test cases are never returned."""
    cases = {name: case for name, case in manifest["cases"].items()
             if case["seg"] and case["split"] in ("train", "val")}
    val = sorted(name for name, case in cases.items()
                 if case["split"] == "val" and (case.get("fold") or 0) == fold)  # "val" without a fold: fold 0
    return sorted(set(cases) - set(val)), val


def holdout_cases(manifest):
    """The labelled cases of the test split, sorted."""
    return sorted(name for name, case in manifest["cases"].items() if case["seg"] and case["split"] == "test")


def default_prediction_cases(manifest, fold):
    """(names, description) of the cases predict.py segments by default: the test split, or without one (test_fraction
    0) the validation cases of the fold, which selected its checkpoint: not a test result."""
    test = holdout_cases(manifest)
    if test:
        return test, "the test split of dataset.json"
    return split_cases(manifest, fold)[1], (f"the validation cases of fold {fold}: dataset.json has no test split, so "
                                            "these selected the checkpoint and their scores are not a test result")


def fold_cases(manifest, hp):
    """(train_names, val_names) of hp.fold, after checking that the manifest holds hp.num_folds folds."""
    path = Path(hp.prepared_dir) / MANIFEST
    num_folds = manifest["settings"].get("num_folds", 1)
    if num_folds != hp.num_folds:
        raise ValueError(f"{path}: split into {num_folds} fold(s), but num_folds is {hp.num_folds}; set num_folds: "
                         f"{num_folds}, or prepare into a new prepared_dir for {hp.num_folds}")
    if hp.fold >= num_folds:
        raise ValueError(f"fold {hp.fold}: the folds of {path} are 0 .. {num_folds - 1}")
    return split_cases(manifest, hp.fold)


def fold_dir(hp, fold=None):
    """Where the run of a fold (default hp.fold) lives: run_dir itself with one fold (the single split, as before
    folds existed), else run_dir/fold_K."""
    return hp.run_dir if hp.num_folds == 1 else hp.run_dir / f"fold_{hp.fold if fold is None else fold}"


def check_prepared_settings(manifest, hp):
    """ValueError when a setting disagrees with what the prepared arrays were made with (dataset.json):
    the channels and their order, the crop margin, the format (normalisation) of the arrays."""
    prepared = {"channel_names": ", ".join(manifest["channel_names"]),
                "crop_margin": manifest["settings"]["crop_margin"], "format": manifest["version"]}
    current = {"channel_names": ", ".join(hp.channel_names), "crop_margin": hp.crop_margin, "format": FORMAT_VERSION}
    differ = [f"{key} {prepared[key]} (prepared) vs {current[key]} (now)" for key in prepared
              if prepared[key] != current[key]]
    if differ:
        raise ValueError(f"{Path(hp.prepared_dir) / MANIFEST}: the data was prepared with other settings "
                         f"({'; '.join(differ)}): set them back, or run prepare_dataset.py again")


def open_array(path):
    """A prepared .npy memory-mapped (only the header is read now); ValueError naming the file when it is not an
    array of numbers as prepare_dataset.py writes them (Python objects, a damaged header)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{path}: not a prepared array ({reason}); delete it and run prepare_dataset.py "
                         "again") from None
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{path}: not a prepared array (dtype {array.dtype}); delete it and run prepare_dataset.py "
                         "again")
    return array


def labelled_entries(prepared_dir, case_names):
    """Manifest entries of case_names, each checked to exist and to have a segmentation."""
    manifest_path = Path(prepared_dir) / "dataset.json"
    cases = read_manifest(prepared_dir)["cases"]
    entries = []
    for name in case_names:
        if name not in cases:
            raise ValueError(f"{manifest_path}: no case named {name!r}")
        if not cases[name]["seg"]:
            raise ValueError(f"{manifest_path}: case {name!r} has no segmentation")
        for key in ("image", "seg"):  # checked now, not at the first patch of the case hours later
            if not (Path(prepared_dir) / cases[name][key]).is_file():
                raise FileNotFoundError(f"{Path(prepared_dir) / cases[name][key]}: listed in {manifest_path} but "
                                        "missing; run prepare_dataset.py again")
            open_array(Path(prepared_dir) / cases[name][key])  # its header: a readable array of numbers
        entries.append(cases[name])
    if not entries:
        raise ValueError(f"{manifest_path}: no cases to load")
    return entries


MANIFEST = "dataset.json"


FORMAT_VERSION = 1  # bump when the prepared arrays change meaning, so old ones are redone


SPLIT_SETTINGS = ("seed", "test_fraction", "num_folds", "val_fraction")


def assign_splits(names, hp):
    """Labelled names -> {name: [split, fold]} from one seeded permutation: test_fraction of them "test"; the
    rest "val" of fold i % num_folds, or with num_folds 1 val_fraction of them "val" of fold 0, the others "train"."""
    share = lambda fraction, n: min(max(round(fraction * n), 1), n - 1) if fraction > 0 and n >= 2 else 0
    order = [sorted(names)[i] for i in np.random.default_rng(hp.seed).permutation(len(names))]
    n_test = share(hp.test_fraction, len(order))
    rest = order[n_test:]
    if hp.num_folds > 1 and len(rest) < hp.num_folds:
        raise CaseError(f"num_folds {hp.num_folds}: only {len(rest)} labelled case(s) outside the test split")
    n_val = share(hp.val_fraction, len(rest)) if hp.num_folds == 1 else len(rest)
    return {**{name: ["test", None] for name in order[:n_test]},
            **{name: ["val", i % hp.num_folds] if i < n_val else ["train", None] for i, name in enumerate(rest)}}


def read_manifest(prepared_dir, data_format=None):
    """The manifest of a prepared folder, or a clear error saying which script to run first.
    data_format: the labels the caller expects; a folder prepared with another label table is refused."""
    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {prepared_dir}: run prepare_dataset.py first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: unreadable manifest ({error}); run prepare_dataset.py again") from None
    prepared = manifest.get("settings", {}).get("data_format", "brats2020")  # older manifests: BraTS 2020
    labels = lambda name: len(conventions.CONVENTIONS[name].disk_labels)
    if data_format is not None and labels(prepared) != labels(data_format):
        raise ValueError(f"{path}: prepared with data_format {prepared}, whose labels differ from data_format "
                         f"{data_format}; set data_format: {prepared} or run prepare_dataset.py again")
    return manifest
