"""The BraTS conventions: label values on disk, the project's internal labels, the nested regions.

The one label/region table of the project: prepare, train, predict, evaluate and rendering all import it,
so label 4 vs 3 and the nested regions are defined once. Imports no project file.
"""
import numpy as np

# BraTS labels on disk, in the order of the project's internal labels 0..3 (disk 4 -> internal 3).
BRATS_LABELS = (0, 1, 2, 4)
LABEL_NAMES = ("background", "necrotic and non-enhancing core", "edema", "enhancing tumor")
# Nested evaluation regions as sets of internal labels, in the BraTS order WT, TC, ET.
REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
REGION_NAMES = tuple(REGIONS)

_DISK_TO_INTERNAL = np.full(256, 255, dtype=np.uint8)
_DISK_TO_INTERNAL[list(BRATS_LABELS)] = np.arange(len(BRATS_LABELS), dtype=np.uint8)


def brats_to_internal(seg):
    """Disk labels {0,1,2,4} -> internal uint8 {0,1,2,3}; any other value is a ValueError."""
    seg = np.asarray(seg)
    if not np.issubdtype(seg.dtype, np.integer):
        rounded = np.rint(seg)
        if not np.array_equal(rounded, seg):
            bad = np.unique(seg[rounded != seg])[:5]
            raise ValueError(f"non-integer label values {bad.tolist()}; expected {list(BRATS_LABELS)}")
        seg = rounded
    values = np.unique(seg)
    unexpected = [v for v in values.tolist() if v not in BRATS_LABELS]
    if unexpected:
        raise ValueError(f"unexpected label values {unexpected[:5]}; expected {list(BRATS_LABELS)}")
    return _DISK_TO_INTERNAL[seg.astype(np.int64)]


def internal_to_brats(labels):
    """Internal labels {0,1,2,3} -> disk uint8 {0,1,2,4}."""
    return np.asarray(BRATS_LABELS, dtype=np.uint8)[np.asarray(labels, dtype=np.int64)]


def labels_to_regions(labels):
    """Internal labels (...) -> boolean regions (3, ...) in the order WT, TC, ET."""
    labels = np.asarray(labels)
    return np.stack([np.isin(labels, members) for members in REGIONS.values()])
