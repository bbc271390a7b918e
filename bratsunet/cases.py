"""Case folders and label maps: finding the cases of a download, reading and checking a case's NIfTI files, and
finding a case's ground truth or prediction, with one-line errors that name the file."""
import gzip
from collections import namedtuple
from pathlib import Path

import nibabel as nib
import numpy as np

from bratsunet import conventions
from bratsunet.conventions import brats_to_internal
from bratsunet.files import archives_in, folders_with_nifti, is_leftover, nifti_stem, same_or_inside
from bratsunet.generator import MARK

# data_format: the convention the files follow, and the one predictions of the case are written in
Case = namedtuple("Case", "name folder image_paths seg_path data_format", defaults=("brats2020",))


class CaseError(Exception):
    """A problem with one case's files; the message names the file and the problem."""


def _match_case_files(folder, channel_names, seg_channel_name, data_format, need_images=True):
    """(image paths in channel order, seg path or None) of a folder; ValueError naming the problem otherwise
    (conventions.ConventionMismatch for files named as in another convention)."""
    paths = sorted(path for path in folder.iterdir()
                   if path.is_file() and nifti_stem(path) is not None and not is_leftover(path.name))
    stems = [nifti_stem(path) for path in paths]  # a stem twice (.nii and .nii.gz) is refused as several files
    images, seg = conventions.match_case_files(stems, channel_names, seg_channel_name, data_format, need_images)
    return tuple(paths[stems.index(stem)] for stem in images), (paths[stems.index(seg)] if seg else None)


def find_cases(raw_dir, channel_names, seg_channel_name, setting="raw_data_dir", data_format="brats2020",
               need_images=True):
    """(cases sorted by name, problems as (folder, reason)): every folder below raw_dir that holds NIfTI files is
    a case, however deep the download nests it. setting: the hyperparameter that named raw_dir, for the messages.
    Folders named as in another convention than data_format are one error; a raw_dir that mixes them is refused.
    need_images False: cases of their segmentation alone (image_paths empty), found by the same rule."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise CaseError(f"{raw_dir}: {setting} {'is a file, not a folder' if raw_dir.exists() else 'does not exist'}")
    cases, problems, other_format, seen = [], [], [], {}
    for folder in sorted(folders_with_nifti(raw_dir)):
        try:
            images, seg = _match_case_files(folder, channel_names, seg_channel_name, data_format, need_images)
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
        example = channel_names[0] if channel_names and need_images else seg_channel_name
        archives = archives_in(raw_dir)
        unpack = f"; it holds {', '.join(archives[:3])}: unpack {'it' if len(archives) == 1 else 'them'} first"
        unpack = unpack if archives else ""
        raise CaseError(f"{raw_dir}: no case folders with NIfTI files "
                        f"(*{conventions.file_suffix(example, data_format)}.nii[.gz]) found{unpack}")
    return cases, problems


def no_segmentation(case, seg_channel_name):
    """Why a case has no segmentation, naming the NIfTI files that are neither a modality nor the segmentation."""
    others = sorted(p.name for p in case.folder.iterdir()
                    if nifti_stem(p) is not None and not is_leftover(p.name) and p not in case.image_paths)
    unknown = f"; not recognized: {', '.join(others)}" if others else ""
    suffix = conventions.CONVENTIONS[case.data_format].separator + seg_channel_name
    return f"{case.folder}: no segmentation (*{suffix}.nii[.gz]){unknown}"


def _read_whole(path):
    """The nibabel image of path, a compressed file read to its end: nibabel alone stops where the voxels end,
    before gzip's checksum, and would read a file with a flipped byte as if it were fine. Decompressed once,
    in memory (nibabel would decompress the same bytes for the voxels)."""
    image = nib.load(str(path))  # the header: which kind of image
    if not path.name.lower().endswith(".gz"):
        return image
    with gzip.open(path) as file:  # gzip checks the CRC and the length at the end of the stream
        data = file.read()
    return type(image).from_bytes(data)


def load_nifti(path):
    """(array, nibabel image) of a 3D NIfTI file; CaseError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CaseError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise CaseError(f"{path}: empty file (0 bytes)")
    try:
        image = _read_whole(path)
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
                        "LPS, skull-stripped; docs/data-formats.md: scans that are not BraTS-preprocessed; allow_any_grid: True "
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


def case_name(path):
    """{case}.nii.gz or {case}.nii -> case, None for other files and hidden (temporary) ones."""
    for suffix in (".nii.gz", ".nii"):
        if path.name.endswith(suffix) and not path.name.startswith("."):
            return path.name[: -len(suffix)]
    return None


def label_maps(folder, problems=None):
    """{case: path} of the label maps directly in folder. A case with both {case}.nii and {case}.nii.gz is
    left out, with the reason in problems ({case: reason}): which one is meant is not ours to guess."""
    found = {}
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        if path.is_file() and case_name(path):
            found.setdefault(case_name(path), []).append(path)
    if problems is not None:
        problems.update({name: f"{paths[0]}: both {paths[0].name} and {paths[1].name}; remove one"
                         for name, paths in found.items() if len(paths) > 1})
    return {name: paths[0] for name, paths in found.items() if len(paths) == 1}


def modality_files(folder, channel_names):
    """The files of a case folder named as a modality: a message on a missing segmentation lists only the others."""
    return tuple(path for path in folder.iterdir()
                 if any((case_name(path) or "").lower().endswith(channel.lower()) for channel in channel_names))


def find_ground_truth(folders, channel_names, seg_channel_name, reasons=None, data_format="brats2020"):
    """{case: segmentation path} from folders of label maps or of case folders, with or without their modalities
    (the first folder wins). reasons: a dict that gets why a case folder gives no segmentation (a misnamed file)."""
    truth = {}
    for folder in folders:
        found = label_maps(folder, reasons)
        if not found:
            try:  # the truth needs no modality
                cases, problems = find_cases(folder, channel_names, seg_channel_name, data_format=data_format,
                                             need_images=False)
            except CaseError:  # missing or holding no cases: the other folders may have them
                continue
            found = {case.name: case.seg_path for case in cases if case.seg_path is not None}
            if reasons is not None:
                reasons.update({Path(path).name: reason for path, reason in problems})
                reasons.update({case.name: no_segmentation(case._replace(image_paths=modality_files(
                    case.folder, channel_names)), seg_channel_name) for case in cases if case.seg_path is None})
        for name, path in found.items():
            truth.setdefault(name, path)
    return truth


def check_apart(hp):
    """CaseError naming both settings when prediction_dir overlaps a folder of the ground truth (raw_data_dir,
    predict_input_dir): predictions written there would later be read as the ground truth, and score perfectly."""
    for setting in ("raw_data_dir", "predict_input_dir"):
        truth = getattr(hp, setting)
        if truth is not None and (same_or_inside(hp.prediction_dir, truth) or same_or_inside(truth, hp.prediction_dir)):
            raise CaseError(f"prediction_dir {hp.prediction_dir} and {setting} {truth} overlap: predictions and "
                            "ground truth must be in separate folders")


def load_labels(path, data_format="brats2020"):
    """(internal labels (X, Y, Z), nibabel image) of a label map with the labels of data_format (2020: 0, 1, 2, 4)."""
    array, image = load_nifti(path)
    try:
        return brats_to_internal(array, data_format), image
    except ValueError as error:
        raise CaseError(f"{path}: {error}") from None


def prediction_path(prediction_dir, name):
    """The label map of case name in prediction_dir, or None; CaseError when both .nii and .nii.gz are there."""
    problems = {}
    path = label_maps(prediction_dir, problems).get(name)
    if name in problems:
        raise CaseError(problems[name])
    return path


def first_predicted_case(prediction_dir):
    """The first case name of prediction_dir's label maps (rendering's default case); CaseError when there is none."""
    problems = {}
    names = sorted([*label_maps(prediction_dir, problems), *problems])
    if not names:
        raise CaseError(f"{prediction_dir}: no predictions (*.nii.gz): run predict.py or set rendering_sample_name")
    return names[0]
