"""dataset.json, the manifest of a prepared folder: reading it, the split of its cases into the test split and the
folds, the folder of each fold's run, and the checks that settings match the prepared arrays."""
import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from bratsunet import conventions
from bratsunet.cases import CaseError

MANIFEST = "dataset.json"
FORMAT_VERSION = 1  # bump when the prepared arrays change meaning, so old ones are redone
SPLIT_SETTINGS = ("seed", "test_fraction", "num_folds", "val_fraction")
SPLIT_RULE = "case hash"  # in dataset.json; manifests without it were split by one permutation of all cases
GRADES_FILE = "name_mapping.csv"  # BraTS 2020: the grade of each case, beside the case folders
UNGRADED = "any"  # the stratum of cases without a grade


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
    0) the validation cases of the fold: not a test result, since the curves, checkpoint_best.pt and the tuned
    postprocessing were chosen on them."""
    test = holdout_cases(manifest)
    if test:
        return test, "the test split of dataset.json"
    return split_cases(manifest, fold)[1], (
        f"the validation cases of fold {fold}: dataset.json has no test split; no checkpoint trained on them, but the "
        "validation curves (and checkpoint_best.pt, crossval.py's et_min_voxels) were chosen on them, so their scores "
        "are a validation result, not a test result")


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


def labels_convention(manifest):
    """The Convention that the label maps of the prepared cases are written in: the data_format they were prepared
    with, and for msd and nnunet the labels their dataset.json gave."""
    settings = manifest.get("settings", {})
    convention = conventions.convention(settings.get("data_format", "brats2020"))  # older manifests: BraTS 2020
    return convention._replace(disk_labels=tuple(settings.get("disk_labels", convention.disk_labels)))


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


def check_source(prepared_dir, raw_data_dir):
    """CaseError, naming both folders and the setting to change, when prepared_dir holds a dataset.json prepared from
    another raw_data_dir: one dataset's arrays and split never mix with another's."""
    path = Path(prepared_dir) / MANIFEST
    try:
        source = json.loads(path.read_text()).get("settings", {}).get("raw_data_dir")
    except (OSError, ValueError, AttributeError):  # none yet, or unreadable: prepare says so or writes it anew
        return
    same = source is None or Path(source) == Path(raw_data_dir) or (
        Path(source).exists() and Path(raw_data_dir).exists() and os.path.samefile(source, raw_data_dir))
    if not same:
        raise CaseError(f"{path}: prepared from raw_data_dir {source}, not from {raw_data_dir}: set prepared_dir to a "
                        "folder of its own for this data (docs/settings.md: folders of one's own), or raw_data_dir "
                        "back; if the data moved there, delete this dataset.json")


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


def case_position(name, seed):
    """The place of a case in [0, 1): a hash of its name and the seed alone, so no other case moves it."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def share(fraction, n):
    """How many of n cases a fraction takes: at least one and not all of them, when it is above 0."""
    return min(max(round(fraction * n), 1), n - 1) if fraction > 0 and n >= 2 else 0


def cut_below(positions, count):
    """A cut with `count` of the sorted positions below it, halfway between two cases."""
    if count <= 0 or count >= len(positions):
        return 0.0 if count <= 0 else 1.0
    return (positions[count - 1] + positions[count]) / 2


def stratum_cuts(positions, hp):
    """[test cut, cuts between the folds (or the validation cut with one fold)] of one stratum's sorted positions:
    test_fraction of them below the first cut, the rest dealt evenly into num_folds (or val_fraction of it)."""
    n_test = share(hp.test_fraction, len(positions))
    rest = positions[n_test:]
    inner = ([cut_below(rest, round(k * len(rest) / hp.num_folds)) for k in range(1, hp.num_folds)]
             if hp.num_folds > 1 else [cut_below(rest, share(hp.val_fraction, len(rest)))])
    return [cut_below(positions, n_test)] + inner


def split_of(position, cuts, num_folds):
    """[split, fold] of a case at position, from its stratum's cuts."""
    if position < cuts[0]:
        return ["test", None]
    if num_folds > 1:
        return ["val", sum(position >= cut for cut in cuts[1:])]
    return ["val", 0] if position < cuts[1] else ["train", None]


def assign_splits(names, hp, grades=None, cuts=None):
    """Labelled names -> ({name: [split, fold]}, {stratum: cuts}). Each case has a place from the hash of its name
    and seed; per stratum (the grade of grades, {name: grade}, where known) cuts between the places give test_fraction
    of the cases to "test" and deal the others evenly into num_folds ("val" of fold K), or with num_folds 1
    val_fraction of them to "val" of fold 0 and the rest to "train". cuts, {stratum: cuts} of an earlier split with
    these settings, are kept, so cases that come or go move no other case (a stratum without cuts gets new ones)."""
    grades, cuts = grades or {}, dict(cuts or {})
    position = {name: case_position(name, hp.seed) for name in names}
    strata = {}
    for name in names:
        strata.setdefault(grades.get(name, UNGRADED), []).append(name)
    for stratum, members in strata.items():
        cuts.setdefault(stratum, stratum_cuts(sorted(position[name] for name in members), hp))
    splits = {name: split_of(position[name], cuts[grades.get(name, UNGRADED)], hp.num_folds) for name in names}
    rest = [fold for split, fold in splits.values() if split == "val"] if hp.num_folds > 1 else []
    if hp.num_folds > 1 and len(rest) < hp.num_folds:
        raise CaseError(f"num_folds {hp.num_folds}: only {len(rest)} labelled case(s) outside the test split")
    empty = sorted(set(range(hp.num_folds)) - set(rest)) if hp.num_folds > 1 else []
    if empty:
        raise CaseError(f"num_folds {hp.num_folds}: fold {empty[0]} gets no case of the {len(rest)} outside the test "
                        "split (few cases per grade); set fewer folds")
    return splits, {stratum: cuts[stratum] for stratum in strata}


def case_grades(raw_data_dir):
    """{case: grade} from BraTS 2020's name_mapping.csv (Grade HGG or LGG per BraTS_2020_subject_ID) anywhere under
    raw_data_dir; {} without one. The split is stratified by it."""
    for path in sorted(Path(raw_data_dir).rglob(GRADES_FILE)):
        try:
            with open(path, newline="", encoding="utf-8-sig") as file:
                rows = list(csv.DictReader(file))
            return {row["BraTS_2020_subject_ID"].strip(): row["Grade"].strip() for row in rows
                    if row.get("BraTS_2020_subject_ID") and row.get("Grade")}
        except (OSError, UnicodeDecodeError, KeyError, csv.Error) as error:
            print(f"ignored {path} ({type(error).__name__}: {error}): the split is not stratified by grade")
    return {}


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
