"""Raw BraTS case folders -> normalized, cropped .npy arrays per case and a dataset.json manifest.

Also the home of what predict.py and rendering.py share with it: finding cases, loading NIfTI files
with clear errors, and the preprocessing of one case (crop to the brain, z-score over brain voxels).
"""
import errno
import json
import os
from collections import namedtuple
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

import hyperparameters
from conventions import brats_to_internal

MANIFEST = "dataset.json"
FORMAT_VERSION = 1  # bump when the prepared arrays change meaning, so old ones are redone

Case = namedtuple("Case", "name folder image_paths seg_path")


class CaseError(Exception):
    """A problem with one case's files; the message names the file and the problem."""


def atomic_write(path, write):
    """write(temporary_path) beside path, then rename into place: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")  # keeps the suffix (.npy, .nii.gz)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
        raise


def _nifti_stem(path):
    for suffix in (".nii.gz", ".nii"):
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _match_case_files(folder, channel_names, seg_channel_name):
    """(image paths in channel order, seg path or None) of one folder, or CaseError."""
    files = {path: _nifti_stem(path).lower() for path in folder.iterdir()
             if path.is_file() and _nifti_stem(path) is not None}
    images, missing = [], []
    for channel in channel_names:
        found = [p for p, stem in files.items() if stem.endswith("_" + channel.lower())]
        if len(found) > 1:
            raise CaseError(f"{folder}: several files for '{channel}': {sorted(p.name for p in found)}")
        if found:
            images.append(found[0])
        else:
            missing.append(channel)
    if missing:
        raise CaseError(f"{folder}: missing modality {', '.join(missing)}")
    rest = [p for p in files if p not in images]
    segs = [p for p in rest if files[p].endswith("_" + seg_channel_name.lower())]
    if not segs:  # a misnamed segmentation (BraTS 2020 case 355): the one seg-like file left
        segs = [p for p in rest if seg_channel_name.lower() in files[p]]
    if len(segs) > 1:
        raise CaseError(f"{folder}: several segmentation files: {sorted(p.name for p in segs)}")
    return tuple(images), (segs[0] if segs else None)


def find_cases(raw_dir, channel_names, seg_channel_name, setting="raw_data_dir"):
    """Every folder below raw_dir that holds NIfTI files is a case, however deep the download nests it.

    Returns (cases sorted by name, problems as (folder, reason) for folders that cannot be used).
    setting: the hyperparameter that named raw_dir, for the messages."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise CaseError(f"{raw_dir}: {setting} does not exist")
    folders = sorted(Path(root) for root, _, files in os.walk(raw_dir, followlinks=True)  # links: shared data
                     if any(_nifti_stem(Path(f)) is not None for f in files))
    cases, problems, seen = [], [], {}
    for folder in folders:
        try:
            images, seg = _match_case_files(folder, channel_names, seg_channel_name)
        except CaseError as error:
            problems.append((folder, str(error)))
            continue
        if folder.name in seen:
            problems.append((folder, f"{folder}: case name already used by {seen[folder.name]}"))
            continue
        seen[folder.name] = folder
        cases.append(Case(folder.name, folder, images, seg))
    if not cases and not problems:
        example = channel_names[0] if channel_names else seg_channel_name
        raise CaseError(f"{raw_dir}: no case folders with NIfTI files (*_{example}.nii[.gz]) found")
    return cases, problems


def no_segmentation(case, seg_channel_name):
    """Why a case has no segmentation, naming the NIfTI files that are neither a modality nor the segmentation."""
    others = sorted(p.name for p in case.folder.iterdir() if _nifti_stem(p) is not None and p not in case.image_paths)
    unknown = f"; not recognized: {', '.join(others)}" if others else ""
    return f"{case.folder}: no segmentation (*_{seg_channel_name}.nii[.gz]){unknown}"


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


def load_case(case):
    """(image (C, X, Y, Z) in the files' dtype, internal labels uint8 (X, Y, Z) or None, nibabel image of channel 0).

    Intensities stay in their stored type (int16 for BraTS): preprocess() converts only the cropped brain."""
    channels, reference = [], None
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
    labels = None
    if case.seg_path is not None:
        seg, image = load_nifti(case.seg_path)
        _check_same_grid(case.seg_path, seg, image, *reference)
        try:
            labels = brats_to_internal(seg)
        except ValueError as error:
            raise CaseError(f"{case.seg_path}: {error}") from None
    return np.stack(channels), labels, reference[1]


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
        values = channel[brain].astype(np.float32)
        std = values.std()
        out[c][brain] = (values - values.mean()) / (std if std > 0 else 1.0)
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
            "bg_threshold": hp.bg_threshold}


def _fingerprint(case, settings):
    paths = list(case.image_paths) + ([case.seg_path] if case.seg_path else [])
    files = {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in paths}
    return {"settings": settings, "files": files}


def prepare_case(case, settings, prepared_dir):
    """Prepare one case (or reuse what a run with the same settings and files left); returns its record."""
    prepared_dir = Path(prepared_dir)
    record_path = prepared_dir / f"{case.name}.json"
    fingerprint = _fingerprint(case, settings)
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        outputs = [record.get("image"), record.get("seg")]
        if record.get("fingerprint") == fingerprint and all(
                (prepared_dir / name).is_file() for name in outputs if name):
            return record
    image, labels, nifti = load_case(case)
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
    atomic_write(record_path, lambda p: p.write_text(json.dumps(record, indent=1)))  # written last: marks done
    return record


def _run_one(case, settings, prepared_dir):
    """(record, None) or (None, reason): a bad case is reported, never raised, so the run goes on.
    A full disk is raised: every later case would fail the same way."""
    try:
        return prepare_case(case, settings, prepared_dir), None
    except CaseError as error:
        return None, str(error)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise CaseError(f"{error.strerror}; the cases prepared so far are kept, run again once there is "
                            "room") from None
        return None, f"{case.folder}: {type(error).__name__}: {error}"
    except (ValueError, MemoryError) as error:
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
    """Prepare every case of hp.raw_data_dir into hp.prepared_dir; returns the manifest."""
    cases, problems = find_cases(hp.raw_data_dir, hp.channel_names, hp.seg_channel_name)
    prepared_dir = Path(hp.prepared_dir)
    try:
        prepared_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CaseError(f"{prepared_dir}: cannot create prepared_dir ({error.strerror})") from None
    for leftover in prepared_dir.glob(".tmp*"):  # half-written files of a killed run (one run per folder at a time)
        leftover.unlink()
    settings = _settings(hp)
    results = _prepare_all(cases, settings, prepared_dir, hp.num_workers)
    skipped = {folder.name: reason for folder, reason in problems}
    skipped.update({name: reason for name, (record, reason) in results.items() if record is None})
    records = {name: record for name, (record, _) in results.items() if record is not None}
    filtered = {name: r["filtered"] for name, r in records.items() if r.get("filtered")}
    kept = {name: r for name, r in records.items() if not r.get("filtered")}
    unlabeled = {case.name: no_segmentation(case, hp.seg_channel_name) + "; prepared as unlabeled" for case in cases
                 if case.seg_path is None and case.name in kept}
    splits = assign_splits([n for n, r in kept.items() if r["seg"]], hp)
    check_resplit(prepared_dir, splits, hp)
    for name, record in kept.items():
        record.pop("fingerprint")
        record["split"], record["fold"] = splits.get(name, ["unlabeled", None])
    manifest = {"version": FORMAT_VERSION, "channel_names": list(hp.channel_names),
                "settings": {**settings, **{key: getattr(hp, key) for key in SPLIT_SETTINGS},
                             "raw_data_dir": str(hp.raw_data_dir)},
                "cases": dict(sorted(kept.items())), "filtered": dict(sorted(filtered.items())),
                "skipped": dict(sorted(skipped.items())), "unlabeled": dict(sorted(unlabeled.items()))}
    atomic_write(prepared_dir / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    print_summary(manifest, prepared_dir)
    return manifest


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


def read_manifest(prepared_dir):
    """The manifest of a prepared folder, or a clear error saying which script to run first."""
    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {prepared_dir}: run prepare_dataset.py first")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: unreadable manifest ({error}); run prepare_dataset.py again") from None


def main():
    hp = hyperparameters.from_command_line()
    try:
        prepare_dataset(hp)
    except (CaseError, OSError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
