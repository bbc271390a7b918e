"""The 3D scene of a case: ground truth | prediction | errors side by side under one camera, above a colour key.

Each viewport holds a translucent brain surface (from one modality) and one smooth surface per tumor label; the
errors viewport holds the false positive and false negative tumor. With a display: a window (the mouse turns all
viewports together); otherwise offscreen (EGL or OSMesa, no X server needed) into a PNG, and a turntable GIF on
request. Surfaces are placed in the NIfTI's scanner millimetres (voxel index -> affine), so superior is up
whatever the storage order."""
import os
import sys
from pathlib import Path

import numpy as np
import vtkmodules.vtkInteractionStyle  # noqa: F401  (the mouse interaction styles)
import vtkmodules.vtkRenderingFreeType  # noqa: F401  (text)
import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (the OpenGL render window and mappers)
from scipy import ndimage
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import vtkLogger
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonMath import vtkMatrix4x4
from vtkmodules.vtkFiltersCore import (vtkFlyingEdges3D, vtkPolyDataNormals, vtkReverseSense,
                                       vtkWindowedSincPolyDataFilter)
from vtkmodules.vtkInteractionStyle import vtkInteractorStyleTrackballCamera
from vtkmodules.vtkRenderingCore import (vtkActor, vtkCamera, vtkPolyDataMapper, vtkRenderer, vtkRenderWindow,
                                         vtkRenderWindowInteractor, vtkTextActor, vtkTextProperty, vtkTextRenderer,
                                         vtkWindowToImageFilter)

from bratsunet.conventions import whole_tumor
from bratsunet.files import atomic_write
from bratsunet.metrics import dice_per_region
from bratsunet.pictures import DPI, ERROR_COLORS, LABEL_COLORS, TRUE_POSITIVE_COLOR, error_key, label_key
from bratsunet.preprocessing import crop_box

# The colors of pictures.py (its LABEL_COLORS explains the hues), opaque: a translucent surface would tint what lies
# inside it (red core seen through green edema looks orange), and the key would lie. Instead the surfaces that
# enclose others show only their far side (a cutaway facing the camera from wherever it looks), so the core inside
# is seen in its own color.
LABEL_STYLE = {  # internal label: (color, far side only), outermost first
    2: (LABEL_COLORS[2], True),  # edema, drawn as the envelope of the whole tumor it surrounds
    3: (LABEL_COLORS[3], True),  # enhancing tumor, the rim around the necrotic core
    1: (LABEL_COLORS[1], False),  # necrotic and non-enhancing core
    4: (LABEL_COLORS[4], False),  # resection cavity (BraTS 2024), apart from the tumor
}


ERROR_STYLE = {name: (color, 1.0) for name, color in ERROR_COLORS.items()}  # opaque: no cyan-magenta blends


BRAIN_COLOR, BRAIN_OPACITY = (0.85, 0.85, 0.85), 0.12


CONTEXT_COLOR, CONTEXT_OPACITY = TRUE_POSITIVE_COLOR, 0.10  # the tumor found, faint, around the errors


BACKGROUND = (0.07, 0.07, 0.07)


VIEW_SIZE = 560  # pixels per viewport side


LEGEND_HEIGHT = 44  # pixels of the color key strip below the viewports


def mask_surface(mask, start=(0, 0, 0), step=1, iterations=20):
    """Mask (X, Y, Z), boolean or 0..1 float -> smooth closed vtkPolyData in voxel index coordinates.

    `start` is the index of mask[0, 0, 0] in the full volume and `step` its voxel stride (for a
    subsampled mask), so all surfaces share one index space and one affine places them all.
    """
    padded = np.pad(mask.astype(np.float32), 1)  # zeros all round: the surface closes at the border
    image = vtkImageData()
    image.SetDimensions(*padded.shape)
    image.SetSpacing(step, step, step)
    image.SetOrigin(*(s - step for s in start))
    # VTK stores x fastest: the Fortran order of an (X, Y, Z) array; one vectorized copy, no voxel loop
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(padded.ravel(order="F"), deep=True))
    contour = vtkFlyingEdges3D()  # marching cubes' faster sibling
    contour.SetInputData(image)
    contour.SetValue(0, 0.5)
    contour.ComputeNormalsOff()
    smooth = vtkWindowedSincPolyDataFilter()  # removes the voxel staircase without shrinking the surface
    smooth.SetInputConnection(contour.GetOutputPort())
    smooth.SetNumberOfIterations(iterations)
    smooth.SetPassBand(0.05)
    smooth.NormalizeCoordinatesOn()
    normals = vtkPolyDataNormals()
    normals.SetInputConnection(smooth.GetOutputPort())
    normals.SplittingOff()
    normals.Update()
    return normals.GetOutput()


def cropped_surface(mask, margin=2):
    """Surface of a mask cropped to its bounding box first: a tumor fills ~1% of the volume."""
    box = crop_box(mask, margin)
    return mask_surface(mask[tuple(slice(a, b) for a, b in box)], start=[a for a, _ in box])


def brain_surface(image, step=2):
    """Outline of the skull-stripped brain (non-zero voxels) from every `step`-th voxel (8x fewer),
    blurred first: the outline is context, and the blur takes out the terraces cheaply."""
    mask = ndimage.gaussian_filter((image[::step, ::step, ::step] != 0).astype(np.float32), sigma=1.0)
    return mask_surface(mask, step=step, iterations=10)


def surface_actor(polydata, affine, color, opacity, far_side_only=False):
    if np.linalg.det(affine[:3, :3]) < 0:  # a mirroring affine turns the triangles inside out (unlit)
        reverse = vtkReverseSense()
        reverse.SetInputData(polydata)
        reverse.ReverseCellsOn()
        reverse.Update()
        polydata = reverse.GetOutput()
    mapper = vtkPolyDataMapper()
    mapper.SetInputData(polydata)
    mapper.ScalarVisibilityOff()
    matrix = vtkMatrix4x4()
    matrix.DeepCopy(affine.ravel().tolist())
    actor = vtkActor()
    actor.SetMapper(mapper)
    actor.SetUserMatrix(matrix)  # voxel index -> scanner mm
    actor.GetProperty().SetColor(color)
    actor.GetProperty().SetOpacity(opacity)
    actor.GetProperty().SetSpecular(0.2 if opacity > 0.5 else 0.0)
    actor.GetProperty().SetFrontfaceCulling(far_side_only)  # the triangles facing the camera are left out
    return actor


def label_actors(labels, affine):
    """One actor per tumor label present in internal labels (X, Y, Z), in LABEL_STYLE order. Edema
    surrounds the core: its surface is the whole tumor's envelope, so no second surface lies on the core's."""
    return [surface_actor(cropped_surface(whole_tumor(labels) if label == 2 else labels == label), affine, color, 1.0,
                          far_side) for label, (color, far_side) in LABEL_STYLE.items() if (labels == label).any()]


def error_actors(truth, pred, affine):
    """False positive and false negative tumor (whole tumor, any label), beside the faint tumor found."""
    true, predicted = whole_tumor(truth), whole_tumor(pred)
    masks = [(true & predicted, CONTEXT_COLOR, CONTEXT_OPACITY), (predicted & ~true, *ERROR_STYLE["false positive"]),
             (true & ~predicted, *ERROR_STYLE["false negative"])]
    return [surface_actor(cropped_surface(m), affine, color, opacity) for m, color, opacity in masks if m.any()]


def text_actor(text, x, y, size, color=(1, 1, 1), centered=False, bold=False, background=None):
    """Text at (x, y) in 0..1 coordinates of its viewport, vertically centered there."""
    actor = vtkTextActor()
    actor.SetInput(text)
    actor.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
    actor.SetPosition(x, y)
    prop = actor.GetTextProperty()
    prop.SetFontSize(size)
    prop.SetColor(color)
    prop.SetBold(bold)
    prop.SetJustification(1 if centered else 0)
    prop.SetVerticalJustification(1)
    if background is not None:
        prop.SetBackgroundColor(background)
        prop.SetBackgroundOpacity(1.0)
    return actor


def text_width(text, size):
    prop = vtkTextProperty()
    prop.SetFontSize(size)
    box = [0, 0, 0, 0]  # x0, x1, y0, y1 in pixels
    vtkTextRenderer().GetBoundingBox(prop, text, box, 72)
    return box[1] - box[0]


def legend_renderer(entries, width, font_size=15, gap=20):
    """The strip below the viewports: a centered key of (name, color) entries, kept out of the 3D
    viewports; a smaller font where the window is too narrow for it."""
    renderer = vtkRenderer()
    renderer.SetBackground(BACKGROUND)
    texts = [f" {name} " for name, _ in entries]
    needed = sum(text_width(t, font_size) + gap for t in texts) + gap
    font_size = max(8, int(font_size * min(1.0, width / needed)))
    widths = [text_width(t, font_size) + gap for t in texts]
    x = (width - sum(widths) + gap) / 2  # pixels
    for text, (_, color), text_pixels in zip(texts, entries, widths):
        renderer.AddActor(text_actor(text, x / width, 0.5, font_size, color=(0, 0, 0), background=color))
        x += text_pixels
    return renderer


def viewport_renderer(title, actors, camera, note):
    renderer = vtkRenderer()
    renderer.SetBackground(BACKGROUND)
    renderer.SetActiveCamera(camera)
    renderer.SetUseOIT(True)  # order-independent blending of the nested translucent surfaces
    for actor in actors:
        renderer.AddActor(actor)
    renderer.AddActor(text_actor(title, 0.5, 0.95, 22, centered=True, bold=True))
    renderer.AddActor(text_actor(note, 0.03, 0.05, 16, color=(0.9, 0.9, 0.9)))
    return renderer


def aim_camera(camera, brain, affine, tumor_center):
    """Oblique view of the whole brain from the front, above and the tumor's side; superior (+z) up."""
    x0, x1, y0, y1, z0, z1 = brain.GetBounds()
    corners = np.array([[x, y, z, 1] for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)])
    world = (affine @ corners.T)[:3].T  # (8, 3) mm
    center, radius = world.mean(0), np.linalg.norm(world.max(0) - world.min(0)) / 2
    side = 1.0 if tumor_center is not None and (affine @ [*tumor_center, 1])[0] > center[0] else -1.0
    direction = np.array([0.55 * side, 0.75, 0.45])  # right or left (x), anterior (+y), superior (+z)
    camera.SetFocalPoint(*center)
    camera.SetPosition(*(center + 2.6 * radius * direction / np.linalg.norm(direction)))
    camera.SetViewUp(0, 0, 1)
    camera.SetViewAngle(30)
    camera.SetClippingRange(radius, 7 * radius)


def error_note(truth, pred, affine):
    ml = abs(np.linalg.det(affine[:3, :3])) / 1000  # mL per voxel
    true, predicted = whole_tumor(truth), whole_tumor(pred)
    fp, fn = np.count_nonzero(predicted & ~true), np.count_nonzero(true & ~predicted)
    return f"false positive {fp * ml:.1f} mL   false negative {fn * ml:.1f} mL"


def build_window(brain_image, truth, pred, affine=None, show_errors=True, title="", offscreen=True,
                 data_format="brats2020"):
    """Arrays -> a vtkRenderWindow: viewports Target | Prediction | Errors above a color key.

    brain_image: (X, Y, Z) one modality, zero outside the brain; truth, pred: internal labels (X, Y, Z)
    or None (a missing one drops its viewport; errors need both); affine: voxel index -> mm (4x4).
    """
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    volumes = [labels for labels in (truth, pred) if labels is not None]
    if not volumes or any(labels.shape != brain_image.shape for labels in volumes):
        raise ValueError(f"need ground truth or prediction of the image's shape {brain_image.shape}")
    views = []  # (title, actors, note at the bottom left)
    if truth is not None:
        views.append(("Target", label_actors(truth, affine), title))
    if pred is not None:
        dice = None if truth is None else dice_per_region(pred, truth)
        note = title if dice is None else "Dice   " + "   ".join(f"{r} {d:.3f}" for r, d in dice.items())
        views.append(("Prediction", label_actors(pred, affine), note))
    if show_errors and truth is not None and pred is not None:
        views.append(("Errors", error_actors(truth, pred, affine), error_note(truth, pred, affine)))
    entries = label_key(volumes, data_format) + (error_key() if len(views) == 3 else [])  # the colors on show

    brain = brain_surface(brain_image)
    tumor = np.argwhere(np.logical_or.reduce([labels > 0 for labels in volumes]))  # (N, 3) voxel indices
    camera = vtkCamera()
    aim_camera(camera, brain, affine, tumor.mean(0) if len(tumor) else None)
    window = vtkRenderWindow()
    window.SetOffScreenRendering(offscreen)
    window.SetMultiSamples(0)
    width, height = VIEW_SIZE * len(views), VIEW_SIZE + LEGEND_HEIGHT
    window.SetSize(width, height)
    window.SetWindowName(title or "rendering")
    bottom = LEGEND_HEIGHT / height
    brain_actor = surface_actor(brain, affine, BRAIN_COLOR, BRAIN_OPACITY)  # shared by the viewports
    for i, (view_title, actors, note) in enumerate(views):
        renderer = viewport_renderer(view_title, [brain_actor] + actors, camera, note or "")
        renderer.SetViewport(i / len(views), bottom, (i + 1) / len(views), 1)
        window.AddRenderer(renderer)
    legend = legend_renderer(entries, width)
    legend.SetViewport(0, 0, 1, bottom)
    window.AddRenderer(legend)
    return window


def window_pixels(window):
    """The rendered window as RGB uint8 (height, width, 3), top row first."""
    window.Render()
    grab = vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.ShouldRerenderOff()  # rendered just above
    grab.Update()
    width, height, _ = grab.GetOutput().GetDimensions()
    pixels = numpy_support.vtk_to_numpy(grab.GetOutput().GetPointData().GetScalars()).reshape(height, width, 3)
    return pixels[::-1].copy()  # VTK's first row is the bottom one


def save_turntable(window, path, frames=36, seconds=6.0):
    """GIF of one full turn of the shared camera around the vertical (superior) axis."""
    from PIL import Image  # Pillow comes with matplotlib
    camera = window.GetRenderers().GetFirstRenderer().GetActiveCamera()
    images = []
    for _ in range(frames):
        images.append(Image.fromarray(window_pixels(window)).quantize(colors=128))
        camera.Azimuth(360.0 / frames)
    atomic_write(path, lambda tmp: images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                                                  duration=int(1000 * seconds / frames), loop=0))


def has_display():
    return sys.platform in ("win32", "darwin") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def prepare_offscreen():
    """Headless Linux: ask VTK for EGL first (it would try X and warn), and keep VTK's warnings quiet."""
    if not has_display():
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    vtkLogger.SetStderrVerbosity(vtkLogger.VERBOSITY_ERROR)


def render_case(brain_image, truth, pred, affine=None, output_png=None, show_errors=True, title="", turntable=None,
                data_format="brats2020"):
    """Render a case to output_png (and a turntable GIF) when given, else in an interactive window.

    Returns the RGB pixels (height, width, 3) of the PNG, or None after the window is closed.
    """
    from PIL import Image
    offscreen = output_png is not None
    if offscreen:
        prepare_offscreen()
    window = build_window(brain_image, truth, pred, affine, show_errors, title, offscreen, data_format)
    pixels = None
    if offscreen:
        pixels = window_pixels(window)
        Path(output_png).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(output_png, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG", dpi=(DPI, DPI)))
    if turntable is not None:
        Path(turntable).parent.mkdir(parents=True, exist_ok=True)
        save_turntable(window, turntable)
    if not offscreen:  # left drag turns, wheel zooms, middle drag pans, all viewports together; q closes
        interactor = vtkRenderWindowInteractor()
        interactor.SetRenderWindow(window)
        interactor.SetInteractorStyle(vtkInteractorStyleTrackballCamera())
        interactor.Initialize()
        window.Render()
        interactor.Start()
    window.Finalize()
    return pixels
