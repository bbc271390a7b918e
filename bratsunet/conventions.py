"""The BraTS conventions by year: file names per modality, label values on disk, the scored regions.

One table per convention (`data_format` in hyperparameters.txt), and the pure functions over file names
and label values that prepare, train, predict, evaluate and rendering share, so label 4 vs 3, the nested
regions and the file suffixes are defined once. Imports no project file.

Inside the project every convention uses the same internal labels: 0 background, 1 necrotic (and
non-enhancing) core, 2 edema, 3 enhancing tumor, and 4 resection cavity (BraTS 2024 post-treatment glioma
only). Only the values on disk and the file names differ between the years.
"""
from pathlib import Path
from typing import NamedTuple

import numpy as np

INTERNAL_LABEL_NAMES = ("background", "necrotic and non-enhancing core", "edema", "enhancing tumor",
                        "resection cavity")
# Regions as sets of internal labels. WT, TC and ET nest; the cavity is scored on its own (BraTS 2024).
ALL_REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,), "RC": (4,)}
# Modalities by meaning (the BraTS 2020 names) and every name a convention gives them.
MEANINGS = {"flair": "flair", "t2f": "flair", "t1": "t1", "t1n": "t1", "t1ce": "t1ce", "t1c": "t1ce",
            "t2": "t2", "t2w": "t2"}


class Convention(NamedTuple):
    description: str
    separator: str  # between the case name and a file's suffix
    suffixes: dict  # modality meaning -> file suffix
    disk_labels: tuple  # the value on disk of each internal label 0, 1, ...
    regions: tuple  # the regions scored, in ALL_REGIONS order
    case_name: str  # a case folder's name, formatted with a number (generated cases)


CONVENTIONS = {
    "brats2020": Convention("BraTS 2020 and 2021", "_", {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2"},
                            (0, 1, 2, 4), ("WT", "TC", "ET"), "BraTS20_Training_{:03d}"),
    "brats2023": Convention("BraTS 2023 (GLI, MEN, MET, PED, SSA)", "-",
                            {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"},
                            (0, 1, 2, 3), ("WT", "TC", "ET"), "BraTS-GLI-{:05d}-000"),
    "brats2024": Convention("BraTS 2024 post-treatment glioma", "-",
                            {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"},
                            (0, 1, 2, 3, 4), ("WT", "TC", "ET", "RC"), "BraTS-GLI-{:05d}-100"),
}
DATA_FORMATS = tuple(CONVENTIONS)

# The default convention's table, as the scripts and tests of BraTS 2020 use it.
BRATS_LABELS = CONVENTIONS["brats2020"].disk_labels
LABEL_NAMES = INTERNAL_LABEL_NAMES[:len(BRATS_LABELS)]
REGION_NAMES = CONVENTIONS["brats2020"].regions
REGIONS = {name: ALL_REGIONS[name] for name in REGION_NAMES}

# The BraTS grid: the SRI24 atlas space at 1 mm, stored with the affine diag(-1, -1, 1) (L, P, S).
GRID_SHAPE = (240, 240, 155)
GRID_SPACING = (1.0, 1.0, 1.0)
GRID_ORIENTATION = ("L", "P", "S")


# ---------------------------------------------------------------- labels

def num_outputs(data_format, target):
    """Network outputs for a convention: its regions (sigmoid) or its labels (softmax)."""
    convention = CONVENTIONS[data_format]
    return len(convention.regions) if target == "regions" else len(convention.disk_labels)


def output_names(target, channels):
    """Names of a network's output channels: the regions or the labels, in their order."""
    return tuple(ALL_REGIONS if target == "regions" else INTERNAL_LABEL_NAMES)[:channels]


def _labels_hint(values, data_format):
    """' (the labels of data_format: X)' when values are all valid in another convention, else ''."""
    others = [name for name, other in CONVENTIONS.items()
              if name != data_format and set(values) <= set(other.disk_labels)]
    return f" (the labels of data_format: {others[0]})" if others else ""


def brats_to_internal(seg, data_format="brats2020"):
    """Disk labels of a convention (2020: {0,1,2,4}) -> internal uint8 {0,1,2,3(,4)}; other values: ValueError."""
    disk_labels = CONVENTIONS[data_format].disk_labels
    seg = np.asarray(seg)
    if not np.issubdtype(seg.dtype, np.integer):
        rounded = np.rint(seg)
        if not np.array_equal(rounded, seg):
            bad = np.unique(seg[rounded != seg])[:5]
            raise ValueError(f"non-integer label values {bad.tolist()}; expected {list(disk_labels)}")
        seg = rounded
    values = np.unique(seg).tolist()
    unexpected = [v for v in values if v not in disk_labels]
    if unexpected:
        raise ValueError(f"unexpected label values {unexpected[:5]}; expected {list(disk_labels)} for "
                         f"data_format {data_format}{_labels_hint(values, data_format)}")
    table = np.zeros(max(disk_labels) + 1, dtype=np.uint8)
    table[list(disk_labels)] = np.arange(len(disk_labels), dtype=np.uint8)
    return table[seg.astype(np.int64)]


def internal_to_brats(labels, data_format="brats2020"):
    """Internal labels -> disk uint8 labels of a convention. A label the convention lacks (the resection
    cavity outside BraTS 2024) becomes background: it is no tumor region there."""
    table = np.zeros(len(INTERNAL_LABEL_NAMES), dtype=np.uint8)
    disk_labels = CONVENTIONS[data_format].disk_labels
    table[:len(disk_labels)] = disk_labels
    return table[np.asarray(labels, dtype=np.int64)]


def whole_tumor(labels):
    """The whole tumor (WT) of internal labels: any tumor label, not the resection cavity."""
    return np.isin(labels, ALL_REGIONS["WT"])


def labels_to_regions(labels, regions=REGION_NAMES):
    """Internal labels (...) -> boolean regions (len(regions), ...), by default WT, TC, ET."""
    labels = np.asarray(labels)
    return np.stack([np.isin(labels, ALL_REGIONS[name]) for name in regions])


# ---------------------------------------------------------------- file names

def meaning(channel):
    """The modality a channel name means (t2f -> flair); names outside MEANINGS mean themselves."""
    return MEANINGS.get(channel.lower(), channel.lower())


def file_suffix(channel, data_format):
    """'_t1ce' (2020) or '-t1c' (2023) for channel t1ce or t1c: the end of the file stem."""
    convention = CONVENTIONS[data_format]
    return convention.separator + convention.suffixes.get(meaning(channel), channel.lower())


class ConventionMismatch(ValueError):
    """The files of a case are named as in another convention than data_format."""


def _with_suffix(stems, suffix):
    return [stem for stem in stems if stem.lower().endswith(suffix)]


def _named_otherwise(data_format):
    """The conventions whose file names differ from data_format's (2023 and 2024 share theirs)."""
    own = CONVENTIONS[data_format]
    return [name for name, other in CONVENTIONS.items()
            if (other.separator, other.suffixes) != (own.separator, own.suffixes)]


def match_case_files(stems, channel_names, seg_name, data_format, need_images=True):
    """File stems of one case folder -> (stem per channel in channel order, segmentation stem or None).

    ValueError when a modality is missing or found twice. When the files follow another convention the
    message names it and the setting to change; a folder that mixes conventions is said to. need_images False
    (the ground truth needs no modality): no image is looked for, the segmentation is found as with them."""
    images, missing = [], []
    for channel in channel_names if need_images else ():
        found = _with_suffix(stems, file_suffix(channel, data_format))
        if len(found) > 1:
            raise ValueError(f"several files for '{channel}': {sorted(found)}")
        images.extend(found) if found else missing.append(channel)
    if missing:
        others = {name: [stem for channel in missing for stem in _with_suffix(stems, file_suffix(channel, name))]
                  for name in _named_otherwise(data_format)}
        others = {name: found for name, found in others.items() if found}
        if not others:
            raise ValueError(f"missing modality {', '.join(missing)}")
        example, setting = next(iter(others.values()))[0], " or ".join(others)
        if len(missing) < len(channel_names):
            raise ValueError(f"mixes the file names of data_format {data_format} and {setting} (e.g. {example}); "
                             f"missing modality {', '.join(missing)}")
        raise ConventionMismatch(f"files named as in {CONVENTIONS[next(iter(others))].description} (e.g. {example}), "
                                 f"not as data_format {data_format} names them: set data_format: {setting}")
    return images, segmentation_stem(stems, channel_names, seg_name, data_format)


def segmentation_stem(stems, channel_names, seg_name, data_format):
    """The segmentation among the file stems of a case folder, or None; the one rule of every script. The file
    named {case}{separator}{seg_name}, else the one file whose name holds seg_name, as BraTS 2020 case 355's
    W39_1998.09.19_Segm; never a modality's file (a case whose name holds "seg"). ValueError for several."""
    modality = tuple(file_suffix(channel, data_format) for channel in channel_names)
    rest = [stem for stem in stems if not stem.lower().endswith(modality)]
    segs = _with_suffix(rest, CONVENTIONS[data_format].separator + seg_name.lower())
    if not segs:  # a misnamed segmentation: the one seg-like file left
        segs = [stem for stem in rest if seg_name.lower() in stem.lower()]
    if len(segs) > 1:
        raise ValueError(f"several segmentation files: {sorted(segs)}")
    return segs[0] if segs else None


# ---------------------------------------------------------------- the grid

def axis_codes(affine):
    """Orientation letters of the voxel axes ('L', 'P', 'S' for BraTS): where each axis points most."""
    rotation = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(("RAS" if rotation[i, j] > 0 else "LPI")[i]
                 for j, i in enumerate(np.abs(rotation).argmax(axis=0)))


def border_voxels(volume):
    """The voxels of a volume's six faces, flattened (edges and corners more than once)."""
    return np.concatenate([face.ravel() for axis in range(3) for face in (volume.take(0, axis), volume.take(-1, axis))])


def grid_differences(head, spacing, affine, any_shape=False):
    """What differs from the BraTS grid, as texts (none when in it). head: non-zero voxels (X, Y, Z) of any
    channel; spacing in mm; any_shape: the shape is not checked (small generated phantoms)."""
    differences, times = [], " x ".join
    spacing = [float(s) for s in spacing]
    if not np.allclose(spacing, GRID_SPACING, atol=0.01):
        differences.append(f"spacing {times(f'{s:g}' for s in spacing)} mm")
    if head.shape != GRID_SHAPE and not any_shape:
        differences.append(f"shape {times(str(n) for n in head.shape)}")
    rotation = np.asarray(affine, dtype=np.float64)[:3, :3]
    directions = np.abs(rotation / np.linalg.norm(rotation, axis=0))  # unit column per voxel axis
    if not np.allclose(directions, np.round(directions), atol=1e-3):
        differences.append(f"oblique axes (nearest orientation {''.join(axis_codes(affine))})")
    elif axis_codes(affine) != GRID_ORIENTATION:
        differences.append(f"orientation {''.join(axis_codes(affine))} (BraTS: {''.join(GRID_ORIENTATION)})")
    border = border_voxels(head)
    if border.mean() > 0.02 or head.mean() > 0.5:  # a skull-stripped brain leaves the border and most voxels 0
        differences.append(f"not skull-stripped ({100 * border.mean():.0f}% of the border voxels and "
                           f"{100 * head.mean():.0f}% of all voxels non-zero)")
    return differences


def background_note(paths, arrays, niftis):
    """'; background is not 0 in FILE (...)' for the channel whose border is most often non-zero, when more than
    half of it is: the brain mask, the crop and the z-score take the non-zero voxels for brain, so a background
    that is not 0 (no skull stripping, an intercept in the header, all-negative values) would enter all three."""
    borders = [border_voxels(array) for array in arrays]
    worst = int(np.argmax([np.count_nonzero(border) for border in borders]))
    border, image = borders[worst], niftis[worst]
    if np.count_nonzero(border) <= border.size // 2:
        return ""
    values, counts = np.unique(border, return_counts=True)
    intercept = getattr(image.dataobj, "inter", 0.0)
    cause = f"; the header's intercept scl_inter is {intercept:g}" if intercept and np.isfinite(intercept) else ""
    return (f"; background is not 0 in {Path(paths[worst]).name} (the volume's border is mostly "
            f"{values[counts.argmax()]:g}{cause})")
