"""The pictures' shared colours and keys, and the picture of an axial slice with its labels: TensorBoard's
validation slice and rendering.py's overlay PNG."""
from pathlib import Path

import numpy as np
from scipy import ndimage

from bratsunet import conventions
from bratsunet.files import atomic_write
from bratsunet.preprocessing import crop_box

# The colors (RGB 0..1) of the internal labels, outermost first, in slice_overlay_png and rendering.py's surfaces.
# The hues lie far apart and far from the neutral grey brain: edema green (120 deg), necrotic/non-enhancing core
# red (3), enhancing tumor blue (222), resection cavity amber; false positive magenta (307), false negative cyan (180).
LABEL_COLORS = {2: (0.10, 0.80, 0.10), 3: (0.15, 0.40, 1.00), 1: (1.00, 0.12, 0.08), 4: (1.00, 0.75, 0.00)}


ERROR_COLORS = {"false positive": (1.00, 0.15, 0.90), "false negative": (0.05, 0.90, 0.90)}


# Outline colors (0..255) of the validation slice: whole tumor as edema green, tumor core as necrotic red, ET blue.
REGION_COLORS = {"WT": (25, 204, 25), "TC": (255, 31, 20), "ET": (38, 102, 255)}


def slice_picture(image, truth, pred):
    """(Y, 2X, 3) uint8: the axial slice with the most true tumor, the image (X, Y, Z) in grey with the
    region outlines of the truth (left) and the prediction (right); internal labels (X, Y, Z)."""
    z = int(np.argmax((truth > 0).sum(axis=(0, 1))))
    plane = image[:, :, z]
    brain = plane[plane != 0]
    low, high = np.percentile(brain, (0.5, 99.5)) if brain.size else (0.0, 1.0)
    grey = (255 * np.clip((plane - low) / max(high - low, 1e-6), 0, 1)).astype(np.uint8)  # (X, Y)
    panels = []
    for labels in (truth[:, :, z], pred[:, :, z]):
        rgb = np.repeat(grey[..., None], 3, axis=-1)  # (X, Y, 3)
        for region, members in conventions.REGIONS.items():
            mask = np.isin(labels, members)
            rgb[mask & ~ndimage.binary_erosion(mask)] = REGION_COLORS[region]
        panels.append(np.flip(rgb.swapaxes(0, 1), axis=0))  # (Y, X, 3): rows along y, the last one on top
    return np.ascontiguousarray(np.concatenate(panels, axis=1))


def overlay_rgba(labels, styles):
    """Labels (X, Y) -> RGBA (X, Y, 4) in the colors of styles [(label, color)], transparent where unlabeled."""
    rgba = np.zeros(labels.shape + (4,))
    for value, color in styles:
        rgba[labels == value] = (*color, 0.55)
    return rgba


def slice_overlay_png(image, truth, pred, path, affine=None, title=""):
    """rendering.py's PNG of the axial slice with the most tumor: the image with truth | prediction | errors
    colored, shown as radiology viewers show it (arrays turned to RAS; anterior up, patient's right on the left)."""
    import nibabel as nib
    from matplotlib.figure import Figure  # no pyplot: no GUI backend needed
    orientation = nib.orientations.io_orientation(np.eye(4) if affine is None else np.asarray(affine))
    image, truth, pred = (None if a is None else nib.orientations.apply_orientation(a, orientation)
                          for a in (image, truth, pred))  # (R, A, S)
    per_slice = conventions.whole_tumor(truth if truth is not None else pred).sum(axis=(0, 1))  # tumor per axial slice
    z = int(np.argmax(per_slice if per_slice.any() else (image != 0).sum(axis=(0, 1))))  # none: the widest brain
    (x0, x1), (y0, y1), _ = crop_box(image[:, :, z:z + 1] != 0, 0)  # this slice's brain (all if none)
    crop = (slice(x0, x1), slice(y0, y1), z)
    image, truth, pred = (None if a is None else a[crop] for a in (image, truth, pred))  # (R, A)
    label_styles = list(LABEL_COLORS.items())
    panels = [(name, labels, label_styles) for name, labels in (("Target", truth), ("Prediction", pred))
              if labels is not None]
    if truth is not None and pred is not None:
        true, predicted = conventions.whole_tumor(truth), conventions.whole_tumor(pred)
        errors = 1 * (predicted & ~true) + 2 * (true & ~predicted)  # 1 FP, 2 FN
        panels.append(("Errors", errors, list(enumerate(ERROR_COLORS.values(), 1))))
    bright = np.percentile(image[image > 0], 99.5) if (image > 0).any() else 1.0  # 0 black, top 0.5% white
    figure = Figure(figsize=(4 * len(panels), 4.4), facecolor="black")
    for i, (name, labels, styles) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), i + 1)
        for layer, cmap in ((image, "gray"), (overlay_rgba(labels, styles), None)):
            # (R, A) -> picture rows anterior up (origin lower), columns from the patient's right to left
            axes.imshow(np.flip(layer.swapaxes(0, 1), axis=1), cmap=cmap, vmin=0, vmax=bright, origin="lower",
                        interpolation="nearest")
        axes.set_title(name, color="white")
        axes.text(-0.06, 0.5, "R", color="white", transform=axes.transAxes)
        axes.text(1.02, 0.5, "L", color="white", transform=axes.transAxes)
        axes.axis("off")
    figure.suptitle(f"{title}  axial slice {z} (RAS)", color="white")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100, facecolor="black",
                                                                  bbox_inches="tight"))
