"""The pictures' shared colours, keys and resolution, and the picture of an axial slice with its labels: rendering.py's
overlay PNG and TensorBoard's validation slice are the same picture."""
from pathlib import Path

import numpy as np

from bratsunet import conventions
from bratsunet.files import atomic_write
from bratsunet.preprocessing import crop_box

DPI = 150  # every saved picture: sharp when printed

# The colours (RGB 0..1) of the internal labels, outermost first, in every picture: the slice overlays, the 3D
# surfaces, the comparison of generated and real cases. The hues lie far apart and far from the neutral grey
# brain: edema green (120 deg), necrotic/non-enhancing core red (3), enhancing tumor blue (222), resection
# cavity amber (45); false positive magenta (307), false negative cyan (180), true positive white.
LABEL_COLORS = {2: (0.10, 0.80, 0.10), 3: (0.15, 0.40, 1.00), 1: (1.00, 0.12, 0.08), 4: (1.00, 0.75, 0.00)}


ERROR_COLORS = {"false positive": (1.00, 0.15, 0.90), "false negative": (0.05, 0.90, 0.90)}


TRUE_POSITIVE_COLOR = (1.0, 1.0, 1.0)  # tumor found: the errors' context


# A region in the colour of the label that makes its outside: whole tumor as edema, tumor core as necrotic core.
REGION_COLORS = {"WT": LABEL_COLORS[2], "TC": LABEL_COLORS[1], "ET": LABEL_COLORS[3], "RC": LABEL_COLORS[4]}


ALPHA = 0.55  # of a label's colour over the grey image in a slice


def label_key(volumes, data_format="brats2020"):
    """[(name with its label on disk, colour)] of the labels present in any of volumes (internal labels)."""
    disk_labels = conventions.convention(data_format).disk_labels  # the key names labels as the files hold them
    return [(f"{conventions.INTERNAL_LABEL_NAMES[label]} ({disk_labels[label]})", color)
            for label, color in LABEL_COLORS.items() if any((labels == label).any() for labels in volumes)]


def error_key():
    """[(name, colour)] of the errors picture: what was missed, what was added, and what was found."""
    return [*ERROR_COLORS.items(), ("true positive", TRUE_POSITIVE_COLOR)]


def error_labels(truth, pred):
    """(X, Y, Z) 1 false positive, 2 false negative, 3 true positive tumor (whole tumor, any label); 0 elsewhere."""
    true, predicted = conventions.whole_tumor(truth), conventions.whole_tumor(pred)
    return (1 * (predicted & ~true) + 2 * (true & ~predicted) + 3 * (true & predicted)).astype(np.uint8)


# ---------------------------------------------------------------- the axial slice

def as_ras(affine, *volumes):
    """Volumes (X, Y, Z) in storage order -> the same turned to RAS (axes toward right, anterior, superior)."""
    import nibabel as nib
    orientation = nib.orientations.io_orientation(np.eye(4) if affine is None else np.asarray(affine))
    return [None if volume is None else nib.orientations.apply_orientation(volume, orientation) for volume in volumes]


def as_shown(plane):
    """An axial plane (R, A) -> (rows, columns) as radiology viewers show it: anterior up, the patient's right on the
    left of the picture."""
    return plane.T[::-1, ::-1]


def grey(image, plane):
    """(rows, columns, 3) 0..1: plane in grey, from the 0.5th to the 99.5th percentile of the brain (image != 0)
    of the whole volume; outside the brain black (raw scans and z-scored ones alike)."""
    brain = image[image != 0]
    low, high = np.percentile(brain, (0.5, 99.5)) if brain.size else (0.0, 1.0)
    value = np.where(plane != 0, np.clip((plane - low) / max(high - low, 1e-6), 0, 1), 0.0)
    return np.repeat(value[..., None], 3, axis=-1)


def colored(base, labels, styles):
    """base (rows, columns, 3) with each (label value, colour) of styles blended over it at ALPHA."""
    rgb = base.copy()
    for value, color in styles:
        rgb[labels == value] = (1 - ALPHA) * rgb[labels == value] + ALPHA * np.asarray(color)
    return rgb


def slice_figure(image, truth, pred, affine=None, title="", data_format="brats2020"):
    """A matplotlib Figure of the axial slice with the most tumor: the image (X, Y, Z) in grey with the labels of
    truth | prediction | errors (internal labels (X, Y, Z); a missing one drops its panel), under a colour key."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend needed
    from matplotlib.patches import Patch
    image, truth, pred = as_ras(affine, image, truth, pred)  # (R, A, S)
    per_slice = conventions.whole_tumor(truth if truth is not None else pred).sum(axis=(0, 1))  # tumor per axial slice
    z = int(np.argmax(per_slice if per_slice.any() else (image != 0).sum(axis=(0, 1))))  # none: the widest brain
    (x0, x1), (y0, y1), _ = crop_box(image[:, :, z:z + 1] != 0, 0)  # this slice's brain (all if none)
    crop = (slice(x0, x1), slice(y0, y1), z)
    base = grey(image, as_shown(image[crop]))
    label_styles = list(LABEL_COLORS.items())
    panels = [(name, colored(base, as_shown(labels[crop]), label_styles)) for name, labels in
              (("Target", truth), ("Prediction", pred)) if labels is not None]
    key = label_key([labels for labels in (truth, pred) if labels is not None], data_format)
    if truth is not None and pred is not None:
        errors = as_shown(error_labels(truth[crop], pred[crop]))
        panels.append(("Errors", colored(base, errors, list(zip((1, 2, 3), dict(error_key()).values())))))
        key += error_key()
    figure = Figure(figsize=(4 * len(panels), 4.9), facecolor="black")
    for i, (name, rgb) in enumerate(panels):
        axes = figure.add_axes((i / len(panels) + 0.02, 0.14, 1 / len(panels) - 0.04, 0.74))
        axes.imshow(rgb, interpolation="nearest")
        axes.set_title(name, color="white")
        axes.text(-0.02, 0.5, "R", color="white", transform=axes.transAxes, ha="right")
        axes.text(1.02, 0.5, "L", color="white", transform=axes.transAxes)
        axes.axis("off")
    figure.legend(handles=[Patch(facecolor=color, edgecolor="none", label=name) for name, color in key],
                  loc="lower center", ncol=min(len(key), 4), frameon=False, labelcolor="white", fontsize=9)
    figure.suptitle(f"{title}  axial slice {z} (RAS)".strip(), color="white")
    return figure


def slice_overlay_png(image, truth, pred, path, affine=None, title="", data_format="brats2020"):
    """rendering.py's PNG of slice_figure."""
    figure = slice_figure(image, truth, pred, affine, title, data_format)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI, facecolor="black"))


def slice_picture(image, truth, pred, affine=None, title="", data_format="brats2020", dpi=80):
    """slice_figure as RGB uint8 (height, width, 3), for TensorBoard's validation picture (a smaller dpi: one per
    validated epoch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    figure = slice_figure(image, truth, pred, affine, title, data_format)
    figure.set_dpi(dpi)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
