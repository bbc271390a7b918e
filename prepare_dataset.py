"""Raw BraTS case folders -> normalized, cropped .npy arrays per case and a dataset.json manifest.

Also the home of what predict.py and rendering.py share with it: finding cases, loading NIfTI files
with clear errors, and the preprocessing of one case (crop to the brain, z-score over brain voxels).
"""
import contextlib
import errno
import json
from collections import namedtuple
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

import hyperparameters
import conventions
from files import NO_ROOM, atomic_write, folders_with_nifti, is_leftover, nifti_stem, sole_writer
from synthetic import MARK

MANIFEST = "dataset.json"
FORMAT_VERSION = 1  # bump when the prepared arrays change meaning, so old ones are redone

# data_format: the convention the files follow, and the one predictions of the case are written in
Case = namedtuple("Case", "name folder image_paths seg_path data_format", defaults=("brats2020",))


class CaseError(Exception):
    """A problem with one case's files; the message names the file and the problem."""


def _match_case_files(folder, channel_names, seg_channel_name, data_format):
    """(image paths in channel order, seg path or None) of a folder; ValueError naming the problem otherwise
    (conventions.ConventionMismatch for files named as in another convention)."""
    paths = sorted(path for path in folder.iterdir()
                   if path.is_file() and nifti_stem(path) is not None and not is_leftover(path.name))
    stems = [nifti_stem(path) for path in paths]  # a stem twice (.nii and .nii.gz) is refused as several files
    images, seg = conventions.match_case_files(stems, channel_names, seg_channel_name, data_format)
    return tuple(paths[stems.index(stem)] for stem in images), (paths[stems.index(seg)] if seg else None)


def find_cases(raw_dir, channel_names, seg_channel_name, setting="raw_data_dir", data_format="brats2020"):
    """(cases sorted by name, problems as (folder, reason)): every folder below raw_dir that holds NIfTI files is
    a case, however deep the download nests it. setting: the hyperparameter that named raw_dir, for the messages.
    Folders named as in another convention than data_format are one error; a raw_dir that mixes them is refused."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise CaseError(f"{raw_dir}: {setting} {'is a file, not a folder' if raw_dir.exists() else 'does not exist'}")
    cases, problems, other_format, seen = [], [], [], {}
    for folder in sorted(folders_with_nifti(raw_dir)):
        try:
            images, seg = _match_case_files(folder, channel_names, seg_channel_name, data_format)
        except conventions.ConventionMismatch as error:  # gathered into one error below
            other_format.append(f"{folder}: {error}")
            continue
        except ValueError as error:
            problems.append((folder, f"{folder}: {error}"))
            continue
        if folder.name in seen:
            problems.append((folder, f"{folder}: case name already used by {seen[folder.name]}"))
            continue
        seen[folder.name] = folder
        cases.append(Case(folder.name, folder, images, seg, data_format))
    if other_format and cases:
        raise CaseError(f"{raw_dir}: mixes conventions: {len(cases)} case folder(s) named as data_format "
                        f"{data_format} expects, {len(other_format)} otherwise ({other_format[0]}); "
                        "keep one convention per folder")
    if other_format:
        raise CaseError(f"{other_format[0]} ({len(other_format)} case folder(s) of {setting} alike)")
    if not cases and not problems:
        example = channel_names[0] if channel_names else seg_channel_name
        raise CaseError(f"{raw_dir}: no case folders with NIfTI files "
                        f"(*{conventions.file_suffix(example, data_format)}.nii[.gz]) found")
    return cases, problems


def no_segmentation(case, seg_channel_name):
    """Why a case has no segmentation, naming the NIfTI files that are neither a modality nor the segmentation."""
    others = sorted(p.name for p in case.folder.iterdir()
                    if nifti_stem(p) is not None and not is_leftover(p.name) and p not in case.image_paths)
    unknown = f"; not recognized: {', '.join(others)}" if others else ""
    suffix = conventions.CONVENTIONS[case.data_format].separator + seg_channel_name
    return f"{case.folder}: no segmentation (*{suffix}.nii[.gz]){unknown}"


def load_nifti(path):
    """(array, nibabel image) of a 3D NIfTI file; CaseError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CaseError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise CaseError(f"{path}: empty file (0 bytes)")
    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel, gzip and zlib raise many types for broken files
        detail = " ".join(str(error).split())  # some span several lines: the message stays one line
        raise CaseError(f"{path}: not a readable NIfTI file ({type(error).__name__}: {detail})") from None
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise CaseError(f"{path}: expected a 3D volume, got shape {array.shape}")
    return array, image


def load_case(case, allow_any_grid=False):
    """(image (C, X, Y, Z) in the files' dtype (preprocess converts only the cropped brain), internal labels uint8
    (X, Y, Z) or None, nibabel image of channel 0); CaseError outside the BraTS grid unless allow_any_grid."""
    channels, niftis, reference = [], [], None
    for path in case.image_paths:
        array, image = load_nifti(path)
        if reference is None:
            reference = (path, image)
        _check_same_grid(path, array, image, *reference)
        if array.dtype.kind not in "iuf":
            raise CaseError(f"{path}: unsupported data type {array.dtype}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise CaseError(f"{path}: NaN or Inf intensities")
        if not array.any():
            raise CaseError(f"{path}: image is all zero")
        channels.append(array)
        niftis.append(image)
    image, nifti = np.stack(channels), reference[1]  # (C, X, Y, Z)
    # phantoms of synthetic.py (MARK in their header) may be smaller than the BraTS grid
    problems = [] if allow_any_grid else conventions.grid_differences(
        (image != 0).any(axis=0), nifti.header.get_zooms()[:3], nifti.affine, nifti.header["descrip"] == MARK)
    if problems:
        note = conventions.background_note(case.image_paths, channels, niftis)
        raise CaseError(f"{reference[0]}: {', '.join(problems)}{note}: not in the BraTS grid (1 mm, 240 x 240 x 155, "
                        "LPS, skull-stripped; README: scans that are not BraTS-preprocessed; allow_any_grid: True "
                        "reads it anyway)")
    labels = None
    if case.seg_path is not None:
        seg, seg_image = load_nifti(case.seg_path)
        _check_same_grid(case.seg_path, seg, seg_image, *reference)
        try:
            labels = conventions.brats_to_internal(seg, case.data_format)
        except ValueError as error:
            raise CaseError(f"{case.seg_path}: {error}") from None
    return image, labels, nifti


def _check_same_grid(path, array, image, reference_path, reference_image):
    if array.shape != reference_image.shape[:3]:
        raise CaseError(f"{path}: shape {array.shape} differs from {Path(reference_path).name} "
                        f"{reference_image.shape[:3]}")
    if not np.allclose(image.affine, reference_image.affine, atol=1e-3):
        raise CaseError(f"{path}: affine differs from {Path(reference_path).name}")


def crop_box(mask, margin):
    """Bounding box ((start, stop) per axis) of a boolean mask, widened by margin voxels."""
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        start, stop = (hits[0], hits[-1] + 1) if hits.size else (0, mask.shape[axis])
        box.append((max(0, int(start) - margin), min(mask.shape[axis], int(stop) + margin)))
    return tuple(box)


def zscore_brain(image):
    """Per channel z-score over the brain voxels of the whole volume (any channel non-zero); background stays 0."""
    brain = (image != 0).any(axis=0)  # (X, Y, Z)
    out = np.zeros(image.shape, dtype=np.float32)
    for c, channel in enumerate(image):
        values = channel[brain]
        if values.dtype.kind == "f" and values.size:  # float64 beyond float32's range, or squares that overflow:
            values = values / (np.abs(values).max() or 1.0)  # scaled to [-1, 1], as z-scores ignore the scale
        values = values.astype(np.float32)
        std = values.std()
        out[c][brain] = (values - values.mean()) / (std if std > 0 else 1.0)  # |z| < sqrt(voxels): fits float16
    return out


def preprocess(image, margin, mask=None):
    """Crop to the brain (or to mask) plus margin, then z-score: the one preprocessing of prepare and predict."""
    box = crop_box((image != 0).any(axis=0) if mask is None else mask, margin)
    slices = tuple(slice(start, stop) for start, stop in box)
    return zscore_brain(image[(slice(None),) + slices]), box


def _settings(hp):
    """What the prepared arrays depend on; a case prepared with other settings is redone."""
    return {"version": FORMAT_VERSION, "channel_names": list(hp.channel_names),
            "seg_channel_name": hp.seg_channel_name, "crop_margin": hp.crop_margin,
            "bg_threshold": hp.bg_threshold, "data_format": hp.data_format, "allow_any_grid": hp.allow_any_grid}


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
    A full disk is raised: every later case would fail the same way."""
    try:
        return prepare_case(case, settings, prepared_dir), None
    except CaseError as error:
        return None, str(error)
    except (OSError, ValueError, MemoryError) as error:
        if isinstance(error, OSError) and error.errno in NO_ROOM:
            room = ", run again once there is room" if error.errno != errno.EROFS else ""
            raise CaseError(f"{error.strerror}; the cases prepared so far are kept{room}") from None
        return None, f"{case.folder}: {type(error).__name__}: {error}"


def _prepare_all(cases, settings, prepared_dir, num_workers):
    """{name: (record, reason)} over all cases, in worker processes when num_workers > 0."""
    results = {}
    bar = tqdm(total=len(cases), desc="prepare", unit="case")
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


def check_resplit(prepared_dir, splits, hp):
    """A split unlike dataset.json's: CaseError when run_dir holds a run, trained on the old one; else said."""
    try:
        old = read_manifest(prepared_dir)
    except (FileNotFoundError, ValueError):  # not split yet, or unreadable
        return
    before = {name: [case["split"], case.get("fold")] for name, case in old["cases"].items()
              if case["split"] != "unlabeled"}
    if before == splits:
        return
    was, added, gone = old.get("settings", {}), len(set(splits) - set(before)), len(set(before) - set(splits))
    reasons = ", ".join([f"{key} {was.get(key)} -> {getattr(hp, key)}" for key in SPLIT_SETTINGS
                         if was.get(key) != getattr(hp, key) and (key != "val_fraction" or hp.num_folds == 1)]
                        + [f"{added} new case(s)"] * bool(added) + [f"{gone} case(s) gone"] * bool(gone))
    runs = [path for path in (hp.run_dir / "checkpoint_last.pt", *hp.run_dir.glob("fold_*/checkpoint_last.pt"))
            if path.is_file()]
    if runs:
        raise CaseError(f"{Path(prepared_dir) / MANIFEST}: its split would change ({reasons}) under the runs trained "
                        f"on it ({runs[0]}): set the settings back, prepare into a new prepared_dir, or delete this "
                        "dataset.json to split anew")
    print(f"split again ({reasons}): no run in {hp.run_dir} trained on the old split")


def prepare_dataset(hp):
    """Prepare every case of hp.raw_data_dir into hp.prepared_dir; returns the manifest. A prepared folder
    that is up to date is only checked, nothing written: it may be read-only."""
    cases, problems = find_cases(hp.raw_data_dir, hp.channel_names, hp.seg_channel_name, data_format=hp.data_format)
    settings, prepared_dir = _settings(hp), Path(hp.prepared_dir)
    done = {case.name: done_record(case, settings, prepared_dir) for case in cases}
    todo = [case for case in cases if done[case.name] is None]
    path = prepared_dir / MANIFEST
    with sole_writer(prepared_dir, "prepared_dir") if todo or not path.is_file() else contextlib.nullcontext():
        results = {name: (record, None) for name, record in done.items() if record is not None}
        results.update(_prepare_all(todo, settings, prepared_dir, hp.num_workers))
        manifest = build_manifest(hp, settings, cases, problems, results)
        text = json.dumps(manifest, indent=1)
        if not path.is_file() or path.read_bytes() != text.encode():  # unchanged: not rewritten
            atomic_write(path, lambda tmp: tmp.write_text(text))
    print_summary(manifest, prepared_dir)
    return manifest


def build_manifest(hp, settings, cases, problems, results):
    """The dataset.json content: the kept cases with their split, the filtered, skipped and unlabeled ones."""
    skipped = {folder.name: reason for folder, reason in problems}
    skipped.update({name: reason for name, (record, reason) in results.items() if record is None})
    records = {name: record for name, (record, _) in results.items() if record is not None}
    filtered = {name: r["filtered"] for name, r in records.items() if r.get("filtered")}
    kept = {name: r for name, r in records.items() if not r.get("filtered")}
    unlabeled = {case.name: no_segmentation(case, hp.seg_channel_name) + "; prepared as unlabeled" for case in cases
                 if case.seg_path is None and case.name in kept}
    splits = assign_splits([n for n, r in kept.items() if r["seg"]], hp)
    check_resplit(hp.prepared_dir, splits, hp)
    for name, record in kept.items():
        record.pop("fingerprint")
        record["split"], record["fold"] = splits.get(name, ["unlabeled", None])
    return {"version": FORMAT_VERSION, "channel_names": list(hp.channel_names),
            "settings": {**settings, **{key: getattr(hp, key) for key in SPLIT_SETTINGS},
                         "raw_data_dir": str(hp.raw_data_dir)},
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
    for title in ("filtered", "skipped", "unlabeled"):
        for name, reason in manifest.get(title, {}).items():
            print(f"  {title} {name}: {reason}")


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


def main():
    hp = hyperparameters.from_command_line()
    try:
        prepare_dataset(hp)
    except (CaseError, OSError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
