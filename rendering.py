"""3D view of a case: ground truth | prediction | errors side by side, one camera for all viewports.

Each viewport holds a translucent brain surface (from one modality) and one smooth surface per tumor
label; the errors viewport holds the false positive and false negative tumor. With a display: a window
(the mouse turns all viewports together). With render_output set or no display: a PNG, and an axial
slice overlay beside it (VTK renders offscreen through EGL or OSMesa, no X server needed).
render_turntable adds a GIF of the scene turning around the vertical axis. Surfaces are placed in the
NIfTI's scanner millimetres (voxel index -> affine), so superior is up whatever the storage order.

    python rendering.py               # the first case in prediction_dir: a window, or run_dir/render.png
    python rendering.py rendering_sample_name=BraTS20_Training_001 render_output=Images/001_render.png
"""
import time

from bratsunet import settings_text
from bratsunet.cases import CaseError, find_cases, first_predicted_case, load_channels, load_labels, prediction_path
from bratsunet.conventions import meaning
from bratsunet.inference import predict_cases
from bratsunet.pictures import slice_overlay_png
from bratsunet.scene3d import has_display, render_case


# What render() reads: keys, and groups of hyperparameters.txt for all their keys (--help lists them).
SETTINGS = ("raw_data_dir", "predict_input_dir", "prediction_dir", "run_dir", "channel_names", "seg_channel_name",
            "data_format", "rendering", "checkpoint", "device")  # without a prediction: predict.py's too


def find_case(hp, name):
    """The raw case folder called `name` under raw_data_dir or predict_input_dir."""
    folders = [folder for folder in (hp.raw_data_dir, hp.predict_input_dir) if folder is not None]
    for folder in folders:
        try:
            cases, _ = find_cases(folder, hp.channel_names, hp.seg_channel_name, data_format=hp.data_format)
        except CaseError:  # a missing or empty folder: look in the other one
            continue
        for case in cases:
            if case.name == name:
                return case
    raise CaseError(f"case {name}: not found under {' or '.join(str(f) for f in folders)}")


def labels_on_grid(path, shape, data_format="brats2020"):
    """Internal labels (X, Y, Z) of a label map (disk labels of data_format) that must lie on the image's grid."""
    labels, _ = load_labels(path, data_format)
    if labels.shape != shape:
        raise CaseError(f"{path}: shape {labels.shape} differs from the image's {shape}")
    return labels


def render(hp):
    """Render hp.rendering_sample_name (or the first predicted case) as the settings say; returns the PNG or None."""
    name = hp.rendering_sample_name or first_predicted_case(hp.prediction_dir)
    case = find_case(hp, name)
    meanings = [meaning(channel) for channel in hp.channel_names]  # flair is t2f in BraTS 2023
    if meaning(hp.render_modality) not in meanings:
        raise CaseError(f"render_modality {hp.render_modality!r} is not one of channel_names {list(hp.channel_names)}")
    [(_, image, nifti)] = load_channels(case, [meanings.index(meaning(hp.render_modality))])
    truth = labels_on_grid(case.seg_path, image.shape, case.data_format) if case.seg_path is not None else None
    if prediction_path(hp.prediction_dir, name) is None:  # no prediction yet: run the model on this case
        print(f"{name}: no prediction in {hp.prediction_dir}, predicting it now")
        predict_cases(hp, [case])
    path = prediction_path(hp.prediction_dir, name)
    if path is None:
        raise CaseError(f"{hp.prediction_dir}: no prediction {name}.nii.gz was written")
    pred = labels_on_grid(path, image.shape, case.data_format)  # predictions are in the input's convention
    output = hp.render_output
    if output is None and not has_display():
        output = hp.run_dir / "render.png"
    elif output is not None and output.is_dir():  # a folder: the PNG goes into it
        output = output / f"{name}_render.png"
    start = time.perf_counter()
    render_case(image, truth, pred, nifti.affine, output, hp.render_errors, name, hp.render_turntable, case.data_format)
    if output is not None:
        slices = output.with_name(f"{output.stem}_slices.png")
        slice_overlay_png(image, truth, pred, slices, nifti.affine, name, hp.data_format)
        written = [output, slices] + ([hp.render_turntable] if hp.render_turntable is not None else [])
        print(f"rendered {name} in {time.perf_counter() - start:.1f} s: " + ", ".join(str(p) for p in written))
    return output


def main():
    hp = settings_text.from_command_line(__doc__, SETTINGS)
    try:
        render(hp)
    except (CaseError, OSError, ValueError) as error:  # bad case, no checkpoint, bad settings, a folder
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
