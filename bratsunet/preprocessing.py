"""The preprocessing of one case, shared by prepare_dataset.py and predict.py: crop to the brain, z-score over the
brain voxels of the whole volume (never per patch)."""
import numpy as np


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
