"""The BraTS metrics of label maps: Dice, HD95, sensitivity, specificity and volumes per region, with the BraTS
rules for empty regions. Used by training's validation, evaluation, crossval and rendering."""
import numpy as np
import torch
from scipy import ndimage

from bratsunet.conventions import REGION_NAMES, labels_to_regions

# The columns of region_metrics per region, and those the summaries give (mean, median, ...)
METRICS = ("dice", "hd95", "sensitivity", "specificity", "volume_pred", "volume_true")
SUMMARY_METRICS = ("dice", "hd95", "sensitivity", "specificity")

# BraTS rules for empty masks: Dice 1 when both are empty, 0 when one is; HD95 0 when both are
# empty, 373.13 mm (the diagonal of the 240 x 240 x 155 mm BraTS volume) when exactly one is.
HD95_EMPTY = 373.13


def _numpy(array):
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def _same_shape(pred, truth):
    pred, truth = _numpy(pred), _numpy(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {truth.shape}")
    return pred, truth


def _dice(pred_mask, true_mask):
    total = int(np.count_nonzero(pred_mask)) + int(np.count_nonzero(true_mask))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(pred_mask & true_mask)) / total


def dice_per_region(pred, truth, regions=REGION_NAMES):
    """Internal label maps -> {region: Dice} for regions, by default WT, TC, ET (BraTS empty rules)."""
    pred, truth = _same_shape(pred, truth)
    return {name: _dice(p, t) for name, p, t in
            zip(regions, labels_to_regions(pred, regions), labels_to_regions(truth, regions))}


def accuracy(pred, truth):
    """Share of voxels whose internal label is right, over all labels including background."""
    pred, truth = _same_shape(pred, truth)
    return float(np.mean(pred == truth))


def _bounding_box(mask, margin=1):
    """Slices around the True voxels of a non-empty mask, `margin` voxels wider (clipped to the array)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(hits[0] - margin, 0), hits[-1] + margin + 1))
    return tuple(box)


def _surface(mask):
    """Mask voxels with a 6-neighbour outside the mask (voxels beyond the array count as outside)."""
    return mask ^ ndimage.binary_erosion(mask)


def hd95(pred_mask, true_mask, spacing=(1.0, 1.0, 1.0)):
    """95th-percentile Hausdorff distance in mm between two boolean masks (BraTS empty rules).

    The 95th percentile of the distances from each surface voxel of one mask to the other mask's
    surface is taken in each direction, and the larger of the two is returned.
    """
    pred_mask, true_mask = _same_shape(pred_mask, true_mask)
    pred_mask, true_mask = pred_mask.astype(bool), true_mask.astype(bool)
    pred_any, true_any = pred_mask.any(), true_mask.any()
    if not pred_any and not true_any:
        return 0.0
    if not (pred_any and true_any):
        return HD95_EMPTY
    box = _bounding_box(pred_mask | true_mask)  # both surfaces lie inside: distances stay exact
    pred_surface, true_surface = _surface(pred_mask[box]), _surface(true_mask[box])
    sampling = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (pred_mask.ndim,))
    # Euclidean distance of every voxel to the nearest surface voxel of the other mask, in mm
    to_true = ndimage.distance_transform_edt(~true_surface, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)
    return float(max(np.percentile(to_true[pred_surface], 95), np.percentile(to_pred[true_surface], 95)))


def region_metrics(pred, truth, spacing=(1.0, 1.0, 1.0), regions=REGION_NAMES):
    """Internal label maps -> {region: {metric: value} for METRICS} for regions, by default WT, TC, ET.

    Volumes are in mm^3. Sensitivity is 1 when the region is absent from the truth (nothing to miss).
    """
    pred, truth = _same_shape(pred, truth)
    voxel_volume = float(np.prod(np.broadcast_to(np.asarray(spacing, dtype=np.float64), (pred.ndim,))))
    results = {}
    for name, p, t in zip(regions, labels_to_regions(pred, regions), labels_to_regions(truth, regions)):
        n_pred, n_true, n_both = (int(np.count_nonzero(m)) for m in (p, t, p & t))
        true_negatives = p.size - n_pred - n_true + n_both
        results[name] = {
            "dice": _dice(p, t),
            "hd95": hd95(p, t, spacing),
            "sensitivity": n_both / n_true if n_true else 1.0,
            "specificity": true_negatives / (p.size - n_true) if p.size > n_true else 1.0,
            "volume_pred": n_pred * voxel_volume,
            "volume_true": n_true * voxel_volume,
        }
    return results
