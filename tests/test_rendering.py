"""rendering.py: headless renders checked by their pixels, scanner-mm placement, settings -> files."""
import colorsys
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from matplotlib.colors import rgb_to_hsv
from PIL import Image
from scipy import ndimage

import rendering
from bratsunet import generator, pictures, scene3d
from bratsunet.cases import CaseError, load_nifti
from bratsunet.conventions import brats_to_internal
from bratsunet.scene3d import ERROR_STYLE, LABEL_STYLE, LEGEND_HEIGHT, VIEW_SIZE

LABEL_COLORS = {name: LABEL_STYLE[label][0] for name, label in (("core", 1), ("edema", 2), ("enhancing", 3))}
ERROR_COLORS = {name: color for name, (color, _) in ERROR_STYLE.items()}
SHAPE = (48, 48, 32)


def vivid_hues(pixels):
    """(mask of vivid pixels (H, W), their hues 0..1): vivid = not the grey brain, white text or background."""
    hsv = rgb_to_hsv(pixels / 255.0)
    mask = (hsv[..., 1] > 0.35) & (hsv[..., 2] > 0.15)
    return mask, hsv[..., 0][mask]


def color_counts(pixels, palette):
    """{name: number of vivid pixels whose hue is nearest to that palette color's hue}.

    Shading scales a surface color and white highlights desaturate it, but neither moves its hue."""
    _, hue = vivid_hues(pixels)
    names = list(palette)
    centers = np.array([colorsys.rgb_to_hsv(*palette[n])[0] for n in names])
    distance = np.abs(hue[:, None] - centers[None])
    nearest = np.argmin(np.minimum(distance, 1 - distance), axis=1)  # hue is circular
    return {name: int(np.count_nonzero(nearest == i)) for i, name in enumerate(names)}


def viewports(pixels):
    """The 3D viewports of a rendered window, left to right (the legend strip below is left out)."""
    assert pixels.shape[0] == VIEW_SIZE + LEGEND_HEIGHT
    return [pixels[:VIEW_SIZE, i:i + VIEW_SIZE] for i in range(0, pixels.shape[1], VIEW_SIZE)]


def render_to_png(path, image, truth, pred, affine, **kwargs):
    """Render offscreen, then read the PNG back from disk: the test checks the file, not only memory."""
    returned = scene3d.render_case(image, truth, pred, affine, output_png=path, **kwargs)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(pixels, returned)
    assert pixels.std() > 10 and np.count_nonzero(pixels.max(-1) > 60) > 1000  # not blank
    return pixels


def generated(kind, seed):
    images, seg = generator.generate_case(SHAPE, seed=seed, kind=kind)
    return images["flair"], brats_to_internal(seg), generator.brats_affine(SHAPE)


def test_surfaces_land_in_scanner_millimetres():
    """A box of voxels lands where the affine puts it: x flipped, 2.5 mm slices, shifted origin.
    Different extents per axis would catch swapped axes (C instead of Fortran order)."""
    labels = np.zeros((20, 30, 16), np.uint8)
    labels[4:9, 10:22, 3:7] = 2
    affine = np.array([[-1.0, 0, 0, 50], [0, 1, 0, -20], [0, 0, 2.5, 10], [0, 0, 0, 1]])
    (actor,) = scene3d.label_actors(labels, affine)
    # voxels 4..8 -> surface between index 3.5 and 8.5 -> x = 50 - i; y = -20 + j; z = 10 + 2.5 k
    expected = [41.5, 46.5, -10.5, 1.5, 16.25, 26.25]
    assert np.all(np.abs(np.subtract(actor.GetBounds(), expected)) <= [1, 1, 1, 1, 2.5, 2.5]), actor.GetBounds()


def test_generated_case_viewports_show_the_colors_of_their_volumes(tmp_path):
    image, truth, affine = generated("tumor", seed=1)
    assert set(np.unique(truth)) == {0, 1, 2, 3}
    # prediction: no enhancing tumor (it became core), false positive tumor on the +x side, missed edema on -x
    pred = np.where(truth == 3, 1, truth)
    x = np.arange(SHAPE[0])[:, None, None]
    center = np.argwhere(truth > 0).mean(0)[0]
    ring = ndimage.binary_dilation(truth > 0, iterations=2) & (truth == 0)
    pred[ring & (x >= center)] = 2
    pred[(truth == 2) & (x < center)] = 0
    target, prediction, errors = viewports(render_to_png(tmp_path / "case.png", image, truth, pred, affine))
    target, prediction = color_counts(target, LABEL_COLORS), color_counts(prediction, LABEL_COLORS)
    assert target["edema"] > 500 and target["enhancing"] > 200
    assert prediction["edema"] > 500 and prediction["core"] > 200
    assert prediction["enhancing"] == 0
    errors = color_counts(errors, ERROR_COLORS)
    assert errors["false positive"] > 500 and errors["false negative"] > 200


def test_no_enhancing_tumor_no_enhancing_color_and_perfect_prediction_no_errors(tmp_path):
    image, truth, affine = generated("no_enhancing", seed=2)
    assert 3 not in truth and (truth == 1).any() and (truth == 2).any()
    views = viewports(render_to_png(tmp_path / "case.png", image, truth, truth.copy(), affine))
    for view in views[:2]:
        counts = color_counts(view, LABEL_COLORS)
        assert counts["edema"] > 500 and counts["core"] > 200 and counts["enhancing"] == 0
    assert sum(color_counts(views[2], ERROR_COLORS).values()) == 0  # only the grey brain and true tumor


def test_a_resection_cavity_has_its_own_color_and_is_no_tumor_error(tmp_path):
    image, truth, affine = generated("tumor", seed=1)
    healthy = (image > 0) & (truth == 0)
    distance = np.linalg.norm(np.indices(SHAPE) - np.argwhere(healthy).mean(0)[:, None, None, None], axis=0)
    truth[healthy & (distance < 5)] = 4  # BraTS 2024: a cavity in healthy brain
    pred = np.where(truth == 4, 0, truth)  # the cavity missed, the tumor perfect
    views = viewports(render_to_png(tmp_path / "case.png", image, truth, pred, affine, data_format="brats2024"))
    palette = {**LABEL_COLORS, "cavity": LABEL_STYLE[4][0]}
    assert color_counts(views[0], palette)["cavity"] > color_counts(views[1], palette)["cavity"] + 300
    assert sum(color_counts(views[2], ERROR_COLORS).values()) == 0  # a cavity is no tumor: no error


def hue_distance(pixels, colors):
    """Degrees from each vivid pixel's hue to the nearest hue of colors (RGB 0..1)."""
    _, hue = vivid_hues(pixels)
    centers = np.array([colorsys.rgb_to_hsv(*color)[0] for color in colors])
    distance = np.abs(hue[:, None] - centers[None])
    return 360 * np.minimum(distance, 1 - distance).min(axis=1)


def test_every_color_of_a_render_is_one_of_its_key(tmp_path):
    """Nothing blends into a color the key does not name: the core inside edema is red, not orange."""
    image, truth, affine = generated("tumor", seed=1)
    pred = truth.copy()
    pred[truth == 2] = np.where(np.indices(SHAPE)[0][truth == 2] < SHAPE[0] // 2, 0, 2)  # missed edema: errors
    pixels = render_to_png(tmp_path / "case.png", image, truth, pred, affine)
    key = [color for _, color in pictures.label_key([truth, pred]) + pictures.error_key()]
    for view in viewports(pixels):
        distance = hue_distance(view, key)
        assert np.mean(distance > 8) < 0.005, f"{np.mean(distance > 8):.1%} of the colors are none of the key's"
    core = hue_distance(viewports(pixels)[0], [LABEL_COLORS["core"]]) < 8
    assert core.sum() > 200  # the core is seen, in its own red
    assert Image.open(tmp_path / "case.png").info["dpi"] == pytest.approx((pictures.DPI, pictures.DPI), abs=0.1)


def test_superior_is_up_whatever_the_storage_order(tmp_path):
    """Tumor stored in the first slices of a volume whose z axis is flipped: it is the top of the head."""
    image, truth, _ = generated("healthy", seed=3)
    truth[20:28, 20:28, 2:6] = 2
    affine = np.diag([1.0, 1.0, -1.0, 1.0])  # slice index grows toward the feet
    (view,) = viewports(render_to_png(tmp_path / "case.png", image, truth, None, affine))
    rows = np.nonzero(vivid_hues(view)[0])[0]  # a mirroring affine must not leave the surfaces unlit (black)
    assert rows.size > 500 and rows.mean() < VIEW_SIZE * 0.4


def test_real_sample_full_size_renders_fast_and_shows_all_labels(tmp_path, sample_case):
    """240 x 240 x 155: the fused segmentation against one challenge entry's segmentation."""
    name = sample_case.name
    image, nifti = load_nifti(sample_case / f"{name}_flair.nii.gz")
    truth = rendering.labels_on_grid(sample_case / f"{name}_seg.nii.gz", image.shape)
    pred = rendering.labels_on_grid(sample_case.parent / "reference_segmentations" / f"{name}_scan-20.nii.gz", image.shape)
    start = time.perf_counter()
    pixels = render_to_png(tmp_path / "sample.png", image, truth, pred, nifti.affine, title=name)
    assert time.perf_counter() - start < 10  # the target on 2 CPU cores (about 2 s measured)
    target, prediction, errors = viewports(pixels)
    for view in (target, prediction):
        counts = color_counts(view, LABEL_COLORS)
        assert min(counts.values()) > 200, counts
    assert min(color_counts(errors, ERROR_COLORS).values()) > 50
    key = [color for _, color in pictures.label_key([truth, pred]) + pictures.error_key()]
    for view in (target, prediction, errors):  # no blend the key does not name (orange core, blue-violet errors)
        assert np.mean(hue_distance(view, key) > 8) < 0.005


def test_turntable_turns_once_around(tmp_path):
    image, truth, affine = generated("tumor", seed=1)
    scene3d.prepare_offscreen()
    window = scene3d.build_window(image, truth, truth, affine, show_errors=False)
    camera = window.GetRenderers().GetFirstRenderer().GetActiveCamera()
    start = np.array(camera.GetPosition())
    scene3d.save_turntable(window, tmp_path / "turn.gif", frames=4)
    window.Finalize()
    gif = Image.open(tmp_path / "turn.gif")
    frames = []
    for i in range(gif.n_frames):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB"), dtype=np.int16))
    assert len(frames) == 4 and np.abs(frames[0] - frames[2]).mean() > 1
    np.testing.assert_allclose(camera.GetPosition(), start, atol=1e-6)  # back where it began
    assert camera.GetViewUp()[2] > 0.99  # turned around the vertical axis


def test_slice_overlay_shows_label_colors_and_their_key(tmp_path):
    image, truth, affine = generated("tumor", seed=1)
    pictures.slice_overlay_png(image, truth, truth, tmp_path / "slices.png", affine)
    pixels = np.asarray(Image.open(tmp_path / "slices.png").convert("RGB"))
    counts = color_counts(pixels, LABEL_COLORS)
    assert counts["edema"] > 50 and counts["enhancing"] > 10
    for name, color in pictures.label_key([truth]) + pictures.error_key():  # the key's patches, in pure color
        assert np.all(pixels == np.round(255 * np.array(color)), axis=-1).sum() > 50, name
    assert Image.open(tmp_path / "slices.png").info["dpi"] == pytest.approx((pictures.DPI, pictures.DPI), abs=0.1)


def write_prediction(tiny_raw, prediction_dir, name):
    """The case's own ground truth, stored as its prediction."""
    prediction_dir.mkdir(parents=True, exist_ok=True)
    (seg,) = tiny_raw.glob(f"**/{name}_seg.nii*")
    shutil.copy(seg, prediction_dir / f"{name}.nii{'.gz' if seg.name.endswith('.gz') else ''}")


def tumor_case_name(tiny_raw):
    """The first generated case with enhancing tumor (label 4)."""
    segs = sorted(tiny_raw.glob("*/*_seg.nii*"))
    return next(seg.parent.name for seg in segs if (np.asarray(nib.load(seg).dataobj) == 4).any())


def test_render_from_settings_without_display_writes_png(tiny_hp, tiny_raw, monkeypatch):
    name = tumor_case_name(tiny_raw)
    write_prediction(tiny_raw, tiny_hp.prediction_dir, name)
    monkeypatch.setattr(rendering, "has_display", lambda: False)
    output = rendering.render(tiny_hp.replace(render_output=None, rendering_sample_name=None))
    assert output == tiny_hp.run_dir / "render.png"  # the first predicted case, to run_dir without a display
    target, prediction, errors = viewports(np.asarray(Image.open(output).convert("RGB")))
    assert color_counts(prediction, LABEL_COLORS)["enhancing"] > 100
    assert sum(color_counts(errors, ERROR_COLORS).values()) == 0
    assert (tiny_hp.run_dir / "render_slices.png").is_file()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Windows and macOS always have a display")
def test_display_is_found_from_the_environment_on_linux(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert not scene3d.has_display()
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")
    assert scene3d.has_display()


def test_missing_prediction_runs_the_model_on_that_case(tiny_hp, tiny_raw, tmp_path, monkeypatch):
    name = tumor_case_name(tiny_raw)
    calls = []

    def fake_predict_cases(hp, cases):
        calls.append([case.name for case in cases])
        write_prediction(tiny_raw, hp.prediction_dir, cases[0].name)

    monkeypatch.setattr(rendering, "predict_cases", fake_predict_cases)
    hp = tiny_hp.replace(rendering_sample_name=name, render_output=tmp_path / "out.png")
    assert rendering.render(hp) == tmp_path / "out.png" and calls == [[name]]


def test_unknown_case_and_bad_prediction_are_named(tiny_hp, tiny_raw, tmp_path):
    with pytest.raises(CaseError, match="no_such_case"):
        rendering.render(tiny_hp.replace(rendering_sample_name="no_such_case", render_output=tmp_path / "x.png"))
    name = tumor_case_name(tiny_raw)
    tiny_hp.prediction_dir.mkdir(parents=True)
    bad = tiny_hp.prediction_dir / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 2, np.uint8), np.eye(4)), bad)  # valid labels, wrong grid
    with pytest.raises(CaseError, match="shape"):
        rendering.render(tiny_hp.replace(rendering_sample_name=name, render_output=tmp_path / "x.png"))


# ------------------------------------------------------------------ the interactive window, under a real X server
def read_xwd(path):
    """The screen of an Xvfb started with -fbdir: an XWD image (big-endian header, 32-bit BGRX pixels) -> RGB."""
    data = Path(path).read_bytes()
    header = np.frombuffer(data[:100], ">u4")
    header_size, width, height, bits_per_pixel, bytes_per_line, colors = (header[i] for i in (0, 4, 5, 11, 12, 19))
    assert bits_per_pixel == 32 and header[7] == 0  # least significant byte first: B, G, R, unused
    rows = np.frombuffer(data, np.uint8, count=height * bytes_per_line, offset=header_size + 12 * colors)
    return rows.reshape(height, bytes_per_line)[:, : 4 * width].reshape(height, width, 4)[..., 2::-1]


@pytest.fixture
def x_server(tmp_path):
    """(DISPLAY of a fresh Xvfb, the file holding its screen); skipped where Xvfb or xdotool are missing."""
    missing = [tool for tool in ("Xvfb", "xdotool") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install xvfb xdotool; .ci/run installs them)")
    server = subprocess.Popen(["Xvfb", "-displayfd", "1", "-screen", "0", "1920x1200x24", "-fbdir", str(tmp_path),
                               "-nolisten", "tcp"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        yield f":{server.stdout.readline().strip()}", tmp_path / "Xvfb_screen0"
    finally:
        server.terminate()
        server.wait(10)


def test_window_opens_shows_the_three_viewports_and_closes_on_q(tiny_hp, tiny_raw, tmp_path, x_server):
    display, screen = x_server
    name = tumor_case_name(tiny_raw)
    write_prediction(tiny_raw, tiny_hp.prediction_dir, name)
    offscreen = rendering.render(tiny_hp.replace(rendering_sample_name=name, render_output=tmp_path / "off.png"))
    expected = np.asarray(Image.open(offscreen).convert("RGB"))
    env = {**os.environ, "DISPLAY": display}
    env.pop("VTK_DEFAULT_OPENGL_WINDOW", None)  # set for EGL by the offscreen renders in this process
    x = lambda *args: subprocess.run(["xdotool", *args], env=env, capture_output=True, text=True, timeout=60)  # noqa: E731
    window = subprocess.Popen([sys.executable, str(Path(rendering.__file__)), f"raw_data_dir={tiny_raw}",
                               f"prediction_dir={tiny_hp.prediction_dir}", f"rendering_sample_name={name}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        window_id, deadline = "", time.monotonic() + 60
        while not window_id and window.poll() is None and time.monotonic() < deadline:
            window_id = x("search", "--name", f"^{name}$").stdout.strip()
            time.sleep(0.2)
        assert window_id, f"no window: {window.poll()=} {window.stderr.read() if window.poll() is not None else ''}"
        width, height = (int(v) for v in x("getwindowgeometry", "--shell", window_id).stdout.split()[3:5]
                         for v in [v.split("=")[1]])
        assert (height, width) == expected.shape[:2]  # the window is the size of the offscreen image
        shot, deadline = None, time.monotonic() + 30
        while time.monotonic() < deadline:  # until the first frame is drawn and stays
            previous, shot = shot, read_xwd(screen)[:height, :width]
            if previous is not None and shot.std() > 10 and np.array_equal(previous, shot):
                break
            time.sleep(0.5)
        Image.fromarray(shot).save(tmp_path / "window.png")
        for shown, offline in zip(viewports(shot), viewports(expected)):  # Target, Prediction, Errors
            assert color_counts(shown, LABEL_COLORS) == pytest.approx(color_counts(offline, LABEL_COLORS), rel=0.05)
        assert np.abs(shot.astype(np.int16) - expected).mean() < 2  # the same picture, up to the GL context
        x("windowfocus", "--sync", window_id, "key", "q")  # the key the README names
        out, err = window.communicate(timeout=30)
    finally:
        window.kill()
    assert window.returncode == 0, err
    assert x("search", "--name", f"^{name}$").stdout == ""  # the window is gone
