"""The Decathlon layout of the Medical Segmentation Decathlon and of nnU-Net's raw datasets: the dataset folder, its
cases, and the channel order and label values that its dataset.json gives.

    Task01_BrainTumour/dataset.json, imagesTr/BRATS_001.nii.gz     MSD: one 4D file per case (X, Y, Z, channels)
    Dataset137_BraTS2021/dataset.json, imagesTr/BraTS2021_00000_0000.nii.gz, ..._0003.nii.gz
                                                                  nnU-Net: a file per channel, {case}_{index:04d}
    labelsTr/{case}.nii.gz (both), imagesTs/ (cases without labels; nnU-Net's may have labelsTs/)

Problems are ValueErrors whose message names the file or folder (cases.py makes them CaseErrors).
"""
import json
import os
import re
from pathlib import Path

from bratsunet import conventions
from bratsunet.files import folders_with_nifti, is_leftover, nifti_stem

DATASET_JSON = "dataset.json"
IMAGE_FOLDERS = {"imagesTr": "labelsTr", "imagesTs": "labelsTs"}  # each images folder and its labels folder
CHANNEL_FILE = re.compile(r"(.+)_(\d{4})")  # nnU-Net's {case}_{channel index:04d}
SEARCH_DEPTH = 3  # how deep below a folder a dataset folder is looked for (an unpacked archive, nnUNet_raw)


# ---------------------------------------------------------------- the dataset folder

def dataset_roots(folder):
    """The folders at most SEARCH_DEPTH below folder (itself included) that hold a dataset.json beside imagesTr or
    imagesTs, sorted."""
    found, top = [], len(Path(folder).parts)
    for root, folders, files in os.walk(folder, followlinks=True):
        here = Path(root)
        if DATASET_JSON in files and any((here / name).is_dir() for name in IMAGE_FOLDERS):
            found.append(here)
        deep = len(here.parts) - top >= SEARCH_DEPTH or DATASET_JSON in files
        folders[:] = [] if deep else [name for name in folders if not is_leftover(name)]
    return sorted(found)


def dataset_folders(folder, setting="raw_data_dir"):
    """(the dataset folder, its images folders to read): folder itself, or the images folder or labels folder that
    folder is (imagesTs: only its cases), or the one dataset folder below folder; ValueError otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: {setting} {'is a file, not a folder' if folder.exists() else 'does not exist'}")
    labels = {label: images for images, label in IMAGE_FOLDERS.items()}
    if folder.name in {**IMAGE_FOLDERS, **labels} and (folder.parent / DATASET_JSON).is_file():
        images = folder.parent / labels.get(folder.name, folder.name)
        return folder.parent, [images] if images.is_dir() else []
    roots = dataset_roots(folder)
    if len(roots) > 1:
        raise ValueError(f"{folder}: holds {len(roots)} datasets ({', '.join(root.name for root in roots[:4])}): set "
                         f"{setting} to one of them")
    if not roots:
        hint = brats_hint(folder)
        raise ValueError(f"{folder}: no {DATASET_JSON} beside imagesTr or imagesTs found in {setting}" + (
            f"; its case folders are named as {hint}" if hint else ""))
    return roots[0], [roots[0] / name for name in IMAGE_FOLDERS if (roots[0] / name).is_dir()]


def read_json(root):
    """The content of a dataset folder's dataset.json; ValueError naming it when it is not a JSON object."""
    path = Path(root) / DATASET_JSON
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable ({error})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: not a dataset.json (holds a {type(content).__name__})")
    return content


def layout_of(content, image_stems):
    """'nnunet' (channel_names in dataset.json, or files named {case}_0000) or 'msd' (a file per case)."""
    per_channel = bool(image_stems) and all(CHANNEL_FILE.fullmatch(stem) for stem in image_stems)
    return "nnunet" if "channel_names" in content or per_channel else "msd"


def looks_like(folder):
    """'msd' or 'nnunet' when folder is, or holds, a dataset in the Decathlon layout; None otherwise."""
    try:
        root, images = dataset_folders(folder)
        return layout_of(read_json(root), [stem for stem, _ in _image_files(images[0])] if images else [])
    except (ValueError, OSError):
        return None


def brats_hint(folder):
    """'BraTS ... (e.g. FILE): set data_format: X' when the first case folder below folder is named as a BraTS year."""
    first = next(iter(folders_with_nifti(folder)), None)
    stems = [nifti_stem(path) for path in first.iterdir() if nifti_stem(path)] if first else []
    for name, other in conventions.CONVENTIONS.items():
        suffix = conventions.file_suffix("flair", name).lower()
        example = next((stem for stem in stems if stem.lower().endswith(suffix)), None)
        if other.layout == "case folders" and example:
            return f"{other.description} (e.g. {example}): set data_format: {name}"
    return None


# ---------------------------------------------------------------- dataset.json

def _label_meaning(name):
    """The internal label (0 .. 3) a label's name in dataset.json means, or None."""
    text = " ".join(re.sub(r"[^a-z]+", " ", str(name).lower()).split())
    words = set(text.split())
    if text == "background":
        return 0
    if "non enhancing" in text or "nonenhancing" in text or words & {"necrotic", "necrosis", "ncr", "net", "netc"}:
        return 1
    if words & {"edema", "oedema", "ed", "snfh"}:
        return 2
    if "enhancing" in words or text == "et":
        return 3
    return None


def _from_regions(entries, order, path):
    """{internal label: value on disk} of nested regions such as {"whole tumor": {1, 2, 3}, "tumor core": {2, 3},
    "enhancing tumor": {3}}: a value in all three is enhancing, in two the core, in one the edema. order:
    dataset.json's regions_class_order, the value nnU-Net writes for each region; it must be that region's own."""
    chain = sorted(entries.values(), key=len, reverse=True)
    if [len(values) for values in chain] != [3, 2, 1] or not chain[0] >= chain[1] >= chain[2]:
        raise ValueError(f"{path}: labels {entries}: not the three nested BraTS regions (WT, TC, ET)")
    internal = {1: 2, 2: 1, 3: 3}  # in one region (WT): edema; in two (WT, TC): the core; in all three: enhancing
    disk = {internal[sum(value in values for values in chain)]: value for value in chain[0]}
    if order is not None:
        own = [min(values - set().union(*[v for v in chain if len(v) < len(values)])) for values in entries.values()]
        if [int(value) for value in order] != own:
            raise ValueError(f"{path}: regions_class_order {list(order)} does not write each region's own label "
                             f"{own}: its predictions would not be these labels")
    return disk


def disk_labels(content, path):
    """(background, core, edema, enhancing) values on disk from dataset.json's labels: value -> name (MSD,
    nnU-Net v1), name -> value (nnU-Net), or name -> values (nnU-Net's regions, e.g. Dataset137_BraTS2021)."""
    labels = content.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{path}: no labels")
    try:
        if all(str(key).strip().isdigit() for key in labels):
            entries = {str(name): {int(key)} for key, name in labels.items()}
        else:
            entries = {str(name): {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}
                       for name, value in labels.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{path}: labels {labels}: not label values") from None
    background = [name for name, values in entries.items() if values == {0}]
    tumor = {name: values for name, values in entries.items() if values != {0}}
    if any(len(values) > 1 for values in tumor.values()):
        disk = _from_regions(tumor, content.get("regions_class_order"), path)
    else:
        disk = {_label_meaning(name): min(values) for name, values in tumor.items()}
    if not background or set(disk) != {1, 2, 3} or len(set(disk.values())) != 3 or len(tumor) != 3:
        raise ValueError(f"{path}: labels {labels}: not background 0 and the three BraTS tumor labels (edema, "
                         "non-enhancing or necrotic core, enhancing tumor)")
    return (0, disk[1], disk[2], disk[3])


def read_convention(root, data_format):
    """data_format's Convention with the channel order (by meaning) and the labels of root's dataset.json."""
    content, path = read_json(root), Path(root) / DATASET_JSON
    names = content.get("channel_names", content.get("modality"))
    if not isinstance(names, dict) or sorted(map(str, names)) != sorted(str(i) for i in range(len(names))) or not names:
        raise ValueError(f"{path}: no channel_names (or modality) naming the channels 0, 1, ...")
    channels = tuple(conventions.meaning(str(names[key])) for key in sorted(names, key=int))
    return conventions.CONVENTIONS[data_format]._replace(channels=channels, disk_labels=disk_labels(content, path))


def label_convention(data_format, folders):
    """data_format's Convention; for msd and nnunet with the labels of the dataset.json of the first of folders that
    is or holds a dataset (label maps are read and written in its labels). ValueError when none does."""
    own = conventions.convention(data_format)
    if own.layout != "decathlon" or own.channels:  # a BraTS convention, or one read already
        return own
    problems = []
    for folder in folders:
        try:
            return read_convention(dataset_folders(folder)[0], own.name)
        except ValueError as error:
            problems.append(str(error))
    raise ValueError(problems[0] if problems else f"data_format {own.name}: no dataset folder given")


# ---------------------------------------------------------------- the cases

def _image_files(folder):
    """[(stem, path)] of the NIfTI files in folder, sorted; what archivers leave behind is skipped."""
    return sorted((nifti_stem(path), path) for path in Path(folder).iterdir()
                  if path.is_file() and nifti_stem(path) is not None and not is_leftover(path.name))


def no_label_map(name, images_folder):
    """Why a case of a Decathlon dataset has no label map (cases without one are predicted, not trained on)."""
    return f"{Path(images_folder) / name}: no label map {name}.nii.gz in {IMAGE_FOLDERS[Path(images_folder).name]}"


def find_cases(folder, channel_names, data_format, setting="raw_data_dir"):
    """(the dataset's Convention, cases as (name, images folder, image paths, label map or None, channels), problems
    as (path, reason)). channels: for the MSD's 4D files, the index of each of channel_names in the file (its one
    path); None for nnU-Net's file per channel (the paths in channel_names order)."""
    root, image_folders = dataset_folders(folder, setting)
    content, files = read_json(root), {images: _image_files(images) for images in image_folders}
    if content.get("file_ending", ".nii.gz") not in (".nii.gz", ".nii"):
        raise ValueError(f"{root / DATASET_JSON}: file_ending {content['file_ending']}: only NIfTI (.nii.gz, .nii) "
                         "is read")
    found = layout_of(content, [stem for listed in files.values() for stem, _ in listed[:8]])
    if found != data_format:
        raise ValueError(f"{root}: laid out as {conventions.CONVENTIONS[found].description} ("
                         f"{'a file per channel' if found == 'nnunet' else 'one file per case'}), not as data_format "
                         f"{data_format} reads it: set data_format: {found}")
    own = read_convention(root, data_format)
    missing = [channel for channel in channel_names if conventions.meaning(channel) not in own.channels]
    if missing:
        raise ValueError(f"{root / DATASET_JSON}: no channel {', '.join(missing)} among its channels "
                         f"{', '.join(own.channels)}; set channel_names to those")
    wanted = [own.channels.index(conventions.meaning(channel)) for channel in channel_names]
    cases, problems = [], []
    for images, listed in files.items():
        labels = {stem: path for stem, path in _image_files(root / IMAGE_FOLDERS[images.name])} \
            if (root / IMAGE_FOLDERS[images.name]).is_dir() else {}
        per_case = {}
        for stem, path in listed:
            match = CHANNEL_FILE.fullmatch(stem)
            name, index = (stem, 0) if data_format == "msd" else match.groups() if match else (stem, -1)
            per_case.setdefault(name, {}).setdefault(int(index), []).append(path)
        for name, channels in per_case.items():
            twice = [paths for paths in channels.values() if len(paths) > 1]
            absent = [index for index in ([0] if data_format == "msd" else wanted) if index not in channels]
            if -1 in channels:
                problems.append((images / name, f"{channels[-1][0]}: not named {{case}}_XXXX as nnU-Net names a "
                                                f"case's channels (XXXX: the channel's index in {DATASET_JSON})"))
            elif twice:
                problems.append((images / name, f"{images / name}: several files for one channel: "
                                                f"{', '.join(path.name for path in twice[0])}"))
            elif absent:
                problems.append((images / name, f"{images / name}: missing channel file(s) " + ", ".join(
                    f"{name}_{index:04d} ({own.channels[index]})" for index in absent)))
            elif data_format == "msd":
                cases.append((name, images, tuple(channels[0]) if wanted else (), labels.get(name), tuple(wanted)))
            else:
                cases.append((name, images, tuple(channels[index][0] for index in wanted), labels.get(name), None))
    return own, cases, problems
