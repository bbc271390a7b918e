"""Raw BraTS case folders -> normalized, cropped .npy arrays per case and a dataset.json manifest.

Also the home of what predict.py and rendering.py share with it: finding cases, loading NIfTI files
with clear errors, and the preprocessing of one case (crop to the brain, z-score over brain voxels).
"""
import contextlib
import errno
import json
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from bratsunet import settings_text
from bratsunet.cases import CaseError, find_cases, label_convention, load_case, no_segmentation
from bratsunet.console import progress_bar
from bratsunet.files import NO_ROOM, WriteError, atomic_write, sole_writer
from bratsunet.manifest import (FORMAT_VERSION, GRADES_FILE, MANIFEST, SPLIT_RULE, SPLIT_SETTINGS, assign_splits,
                                case_grades, check_source, read_manifest)
from bratsunet.preprocessing import preprocess


# What prepare_dataset() reads: keys, and groups of hyperparameters.txt for all their keys (--help lists them).
SETTINGS = ("raw_data_dir", "prepared_dir", "run_dir", "channel_names", "seg_channel_name", "data_format",
            "allow_any_grid", "bg_threshold", "crop_margin", "test_fraction", "num_folds", "val_fraction", "seed",
            "num_workers")


def _settings(hp):
    """What the prepared arrays depend on; a case prepared with other settings is redone."""
    settings = {"version": FORMAT_VERSION, "channel_names": list(hp.channel_names),
                "seg_channel_name": hp.seg_channel_name, "crop_margin": hp.crop_margin,
                "bg_threshold": hp.bg_threshold, "data_format": hp.data_format, "allow_any_grid": hp.allow_any_grid}
    convention = label_convention(hp.data_format, [hp.raw_data_dir])
    if convention.layout == "decathlon":  # from dataset.json: what the label maps are written in (manifest.py)
        settings.update(disk_labels=list(convention.disk_labels), file_channels=list(convention.channels))
    return settings


def _fingerprint(case, settings):
    paths = list(case.image_paths) + ([case.seg_path] if case.seg_path else [])
    files = {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in paths}
    return {"settings": settings, "files": files}


def done_record(case, settings, prepared_dir):
    """The record of a case prepared before with the same settings and files, whose outputs are all there, or None."""
    record_path = Path(prepared_dir) / f"{case.name}.json"
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    outputs = [name for name in (record.get("image"), record.get("seg")) if name]
    done = record.get("fingerprint") == _fingerprint(case, settings) and all(
        (Path(prepared_dir) / name).is_file() for name in outputs)
    return record if done else None


def prepare_case(case, settings, prepared_dir):
    """Prepare one case (prepare_dataset reuses done_record instead where it can); returns its record."""
    prepared_dir = Path(prepared_dir)
    fingerprint = _fingerprint(case, settings)
    image, labels, nifti = load_case(case, settings["allow_any_grid"])
    brain = (image != 0).any(axis=0)
    tumor_voxels = int((labels > 0).sum()) if labels is not None else None
    record = {"fingerprint": fingerprint, "original_shape": list(brain.shape),
              "affine": nifti.affine.tolist(), "brain_voxels": int(brain.sum()), "tumor_voxels": tumor_voxels,
              "source_files": {"images": [str(p) for p in case.image_paths],
                               "seg": str(case.seg_path) if case.seg_path else None},
              "image": None, "seg": None}
    healthy_share = 1 - tumor_voxels / record["brain_voxels"] if labels is not None else None
    if healthy_share is not None and healthy_share >= settings["bg_threshold"]:
        record["filtered"] = (f"healthy: tumor share {100 * (1 - healthy_share):.4f}% ({tumor_voxels} voxels), "
                              f"filtered at a healthy share >= bg_threshold {settings['bg_threshold']}")
    else:
        mask = brain if labels is None else brain | (labels > 0)  # never crop tumor away
        normalized, box = preprocess(image, settings["crop_margin"], mask)
        record.update(image=f"{case.name}.npy", crop_box=[list(b) for b in box], shape=list(normalized.shape))
        atomic_write(prepared_dir / record["image"], lambda p: np.save(p, normalized.astype(np.float16)))
        if labels is not None:
            record["seg"] = f"{case.name}_seg.npy"
            cropped = np.ascontiguousarray(labels[tuple(slice(s, e) for s, e in box)])
            atomic_write(prepared_dir / record["seg"], lambda p: np.save(p, cropped))
    atomic_write(prepared_dir / f"{case.name}.json", lambda p: p.write_text(json.dumps(record, indent=1)))  # last: done
    return record


def _run_one(case, settings, prepared_dir):
    """(record, None) or (None, reason): a bad case is reported, never raised, so the run goes on.
    A failed write (a full disk) is raised: every later case would fail the same way."""
    try:
        return prepare_case(case, settings, prepared_dir), None
    except CaseError as error:
        return None, str(error)
    except WriteError as error:
        room = ", run again once there is room" if error.errno in NO_ROOM and error.errno != errno.EROFS else ""
        raise CaseError(f"{error.strerror}; the cases prepared so far are kept{room}") from None
    except (OSError, ValueError, MemoryError) as error:
        return None, f"{case.folder}: {type(error).__name__}: {error}"


def _prepare_all(cases, settings, prepared_dir, num_workers):
    """{name: (record, reason)} over all cases, in worker processes when num_workers > 0."""
    results = {}
    bar = progress_bar(total=len(cases), description="prepare", unit="case")
    if num_workers > 0 and len(cases) > 1:
        try:
            with ProcessPoolExecutor(max_workers=min(num_workers, len(cases))) as pool:
                futures = {pool.submit(_run_one, c, settings, prepared_dir): c.name for c in cases}
                try:
                    for future in as_completed(futures):
                        results[futures[future]] = future.result()
                        bar.update()
                except CaseError:
                    pool.shutdown(cancel_futures=True)  # a full disk: start no other case
                    raise
        except (OSError, NotImplementedError, BrokenProcessPool) as error:
            print(f"worker processes could not start ({error}); preparing in this process")
    for case in cases:
        if case.name not in results:
            results[case.name] = _run_one(case, settings, prepared_dir)
            bar.update()
    bar.close()
    return results


def earlier_manifest(prepared_dir):
    """The dataset.json already in prepared_dir, or None (not split yet, or unreadable)."""
    try:
        return read_manifest(prepared_dir)
    except (FileNotFoundError, ValueError):
        return None


def kept_cuts(old, hp):
    """The cuts of the earlier split when it was made by this rule with these settings: cases that come or go then
    move no other case. None otherwise."""
    was = (old or {}).get("settings", {})
    keys = [key for key in SPLIT_SETTINGS if key != "val_fraction" or hp.num_folds == 1]
    if was.get("split_rule") != SPLIT_RULE or any(was.get(key) != getattr(hp, key) for key in keys):
        return None
    return was.get("split_cuts")


def check_resplit(old, splits, hp, before_work=False):
    """A split unlike the earlier dataset.json's: CaseError when run_dir holds a run trained on the old one; else
    said (after the work)."""
    if old is None:
        return
    before = {name: [case["split"], case.get("fold")] for name, case in old["cases"].items()
              if case["split"] != "unlabeled"}
    if before == splits:
        return
    was, added, gone = old.get("settings", {}), len(set(splits) - set(before)), len(set(before) - set(splits))
    reasons = ", ".join([f"{key} {was.get(key)} -> {getattr(hp, key)}" for key in SPLIT_SETTINGS
                         if was.get(key) != getattr(hp, key) and (key != "val_fraction" or hp.num_folds == 1)]
                        + [f"{added} new case(s)"] * bool(added) + [f"{gone} case(s) gone"] * bool(gone)
                        + [f"the split rule: {SPLIT_RULE}"] * (was.get("split_rule") != SPLIT_RULE)) or \
        f"the grades of {GRADES_FILE}"
    runs = [path for path in (hp.run_dir / "checkpoint_last.pt", *hp.run_dir.glob("fold_*/checkpoint_last.pt"))
            if path.is_file()]
    if runs:
        raise CaseError(f"{Path(hp.prepared_dir) / MANIFEST}: its split would change ({reasons}) under the runs "
                        f"trained on it ({runs[0]}): set the settings back, prepare into a new prepared_dir, or delete "
                        "this dataset.json to split anew")
    if not before_work:
        print(f"split again ({reasons}): no run in {hp.run_dir} trained on the old split")


def check_before_work(hp, cases, grades):
    """What refuses a run, said before any case is prepared: cases too few for the folds, a split that would change
    under a trained run, as far as the cases found tell (those dataset.json filtered or skipped left out).
    (prepared_dir from another raw_data_dir was refused before the cases were looked for.)"""
    labelled = [case.name for case in cases if case.seg_path is not None]
    old = earlier_manifest(hp.prepared_dir)
    assign_splits(labelled, hp, grades)  # CaseError when even all of them are too few for num_folds
    if old is not None:
        left_out = set(old.get("filtered", {})) | set(old.get("skipped", {}))
        labelled = [name for name in labelled if name not in left_out]
        check_resplit(old, assign_splits(labelled, hp, grades, kept_cuts(old, hp))[0], hp, before_work=True)


def prepare_dataset(hp):
    """Prepare every case of hp.raw_data_dir into hp.prepared_dir; returns the manifest. A prepared folder
    that is up to date is only checked, nothing written: it may be read-only."""
    check_source(hp.prepared_dir, hp.raw_data_dir)  # another dataset's folder: refused before anything else
    cases, problems = find_cases(hp.raw_data_dir, hp.channel_names, hp.seg_channel_name, data_format=hp.data_format)
    grades = case_grades(hp.raw_data_dir)  # {case: HGG or LGG} where the download says: the strata of the split
    check_before_work(hp, cases, grades)
    settings, prepared_dir = _settings(hp), Path(hp.prepared_dir)
    done = {case.name: done_record(case, settings, prepared_dir) for case in cases}
    todo = [case for case in cases if done[case.name] is None]
    path = prepared_dir / MANIFEST
    with sole_writer(prepared_dir, "prepared_dir") if todo or not path.is_file() else contextlib.nullcontext():
        results = {name: (record, None) for name, record in done.items() if record is not None}
        results.update(_prepare_all(todo, settings, prepared_dir, hp.num_workers))
        manifest = build_manifest(hp, settings, cases, problems, results, grades)
        text = json.dumps(manifest, indent=1)
        if not path.is_file() or path.read_bytes() != text.encode():  # unchanged: not rewritten
            atomic_write(path, lambda tmp: tmp.write_text(text))
    print_summary(manifest, prepared_dir)
    return manifest


def build_manifest(hp, settings, cases, problems, results, grades):
    """The dataset.json content: the kept cases with their split (stratified by grades, {case: grade}), the
    filtered, skipped and unlabeled ones."""
    skipped = {folder.name: reason for folder, reason in problems}
    skipped.update({name: reason for name, (record, reason) in results.items() if record is None})
    records = {name: record for name, (record, _) in results.items() if record is not None}
    filtered = {name: r["filtered"] for name, r in records.items() if r.get("filtered")}
    kept = {name: r for name, r in records.items() if not r.get("filtered")}
    unlabeled = {case.name: no_segmentation(case, hp.seg_channel_name) + "; prepared as unlabeled" for case in cases
                 if case.seg_path is None and case.name in kept}
    old = earlier_manifest(hp.prepared_dir)  # read again under the lock
    splits, cuts = assign_splits([n for n, r in kept.items() if r["seg"]], hp, grades, kept_cuts(old, hp))
    check_resplit(old, splits, hp)  # what could not be known before: cases filtered or skipped anew
    for name, record in kept.items():
        record.pop("fingerprint")
        record["split"], record["fold"] = splits.get(name, ["unlabeled", None])
        if name in grades:
            record["grade"] = grades[name]
    return {"version": FORMAT_VERSION, "channel_names": list(hp.channel_names),
            "settings": {**settings, **{key: getattr(hp, key) for key in SPLIT_SETTINGS},
                         "split_rule": SPLIT_RULE, "split_cuts": cuts, "raw_data_dir": str(hp.raw_data_dir)},
            "cases": dict(sorted(kept.items())), "filtered": dict(sorted(filtered.items())),
            "skipped": dict(sorted(skipped.items())), "unlabeled": dict(sorted(unlabeled.items()))}


def print_summary(manifest, prepared_dir):
    cases, num_folds = manifest["cases"].values(), manifest["settings"]["num_folds"]
    splits = [case["split"] for case in cases]
    folds = [("train", splits.count("train")), ("validation", splits.count("val"))] if num_folds == 1 else [
        (f"{num_folds} folds", " + ".join(str(sum(case["fold"] == k for case in cases)) for k in range(num_folds)))]
    print(f"\n{'prepared into':<14} {prepared_dir}")
    for label, count in folds + [("test", splits.count("test")), ("unlabeled", splits.count("unlabeled")),
                                 ("filtered", len(manifest["filtered"])), ("skipped", len(manifest["skipped"]))]:
        print(f"{label:<14} {count:>5}")
    for grade in sorted({case["grade"] for case in cases if "grade" in case}):  # the strata of the split
        of = [case for case in cases if case.get("grade") == grade]
        count = lambda split, fold=None: sum(c["split"] == split and (fold is None or c["fold"] == fold) for c in of)
        parts = [f"train {count('train')}", f"validation {count('val')}"] if num_folds == 1 else [
            "folds " + " + ".join(str(count("val", k)) for k in range(num_folds))]
        print(f"  grade {grade}: {', '.join(parts)}, test {count('test')} ({GRADES_FILE})")
    for title in ("filtered", "skipped", "unlabeled"):
        for name, reason in manifest.get(title, {}).items():
            print(f"  {title} {name}: {reason}")


def main():
    hp = settings_text.from_command_line(__doc__, SETTINGS)
    try:
        prepare_dataset(hp)
    except (CaseError, OSError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
