"""bratsunet/training_log.py: TensorBoard read back from its event files (also across a resume), the validation picture,
and train.py in a real IPython kernel with the inline backend, as Spyder and PyCharm's console run it."""
import base64
import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from bratsunet import checkpoints, generator, hyperparameters, pictures, training_log

REPO = Path(__file__).resolve().parents[1]
TINY = {"num_workers": 0, "features": "4, 8, 16", "patch_size": "16, 16, 16", "batch_size": 2, "epochs": 2,
        "steps_per_epoch": 3, "val_every": 1, "sw_batch_size": 4, "seed": 3}


def read_events(folder):
    """{tag: [(step, value)]} of the scalars and {tag: [(step, RGB array)]} of the images, as TensorBoard reads them."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (requirements-dev.txt)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    images = {tag: [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")))
                    for e in events.Images(tag)] for tag in events.Tags()["images"]}
    return scalars, images


def test_tensorboard_logs_each_epoch_once_across_a_resume(tmp_path, tiny_prepared, monkeypatch):
    hp = hyperparameters.load(overrides={**TINY, "prepared_dir": tiny_prepared, "run_dir": tmp_path,
                                         "tensorboard": True, "epochs": 3, "steps_per_epoch": 1})
    save = checkpoints.save_checkpoint

    def killed_while_saving_epoch_2(state, path):  # TensorBoard has epoch 2, the checkpoint has not
        if state["epoch"] == 2:
            raise KeyboardInterrupt
        save(state, path)

    monkeypatch.setattr(checkpoints, "save_checkpoint", killed_while_saving_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train.train(hp)
    monkeypatch.setattr(checkpoints, "save_checkpoint", save)
    assert [step for step, _ in read_events(tmp_path / "tensorboard")[0]["loss/train"]] == [1, 2]
    train.train(hp.replace(resume=True))  # epochs 2 and 3 again

    scalars, images = read_events(tmp_path / "tensorboard")
    with open(tmp_path / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    for tag, column in [("loss/train", "train_loss"), ("learning_rate", "lr"), ("accuracy", "accuracy"),
                        *((f"dice/{r}", f"dice_{r}") for r in ("WT", "TC", "ET", "mean"))]:
        assert [step for step, _ in scalars[tag]] == [1, 2, 3], tag  # epoch 2 of the killed run purged
        assert [value for _, value in scalars[tag]] == pytest.approx([float(r[column]) for r in rows], rel=1e-5)
    [(tag, shown)] = images.items()
    assert tag.startswith("validation/BraTS20_Training_") and [step for step, _ in shown] == [1, 2, 3]
    for name, color in pictures.label_key([np.array([1, 2, 3])]):  # the key of the picture: every tumor label
        assert np.all(shown[-1][1] == np.round(255 * np.array(color)), axis=-1).sum() > 20, name


def corner_case():
    """A 40 x 36 x 12 brain in the BraTS orientation (storage x toward the left, y toward the back) with its tumor in
    the patient's right anterior corner, on slice 7: edema around a core -> (image, truth, affine)."""
    shape = (40, 36, 12)
    affine = generator.brats_affine(shape)
    image = np.zeros(shape, np.float32)
    image[2:38, 2:34, 2:10] = np.random.default_rng(0).uniform(50, 150, (36, 32, 8))
    truth = np.zeros(shape, np.uint8)
    truth[3:12, 3:12, 5:9] = 2  # small x and y indices: the patient's right (x) and front (y) in this orientation
    truth[5:9, 5:9, 7] = 1
    return image, truth, affine


def green(pixels):
    """Where the pixels (..., 3) are edema-green over grey: green well above red and blue."""
    pixels = pixels.astype(float) / (255 if pixels.dtype == np.uint8 else 1)
    return (pixels[..., 1] > pixels[..., 0] + 0.15) & (pixels[..., 1] > pixels[..., 2] + 0.15)


def test_tensorboard_picture_is_the_slice_overlay_oriented_and_labelled():
    image, truth, affine = corner_case()
    corner, middle = affine @ [3, 3, 0, 1], affine @ [30, 30, 0, 1]
    assert corner[0] > middle[0] and corner[1] > middle[1]  # index 3 lies to the right and to the front (RAS+)
    figure = pictures.slice_figure(image, truth, truth, affine, "case")
    assert [axes.get_title() for axes in figure.axes] == ["Target", "Prediction", "Errors"]
    target = figure.axes[0].images[0].get_array()  # (rows, columns, 3) as shown
    tumor = np.argwhere(green(target))
    height, width = target.shape[:2]
    assert len(tumor) > 20 and tumor[:, 0].mean() < height / 3 and tumor[:, 1].mean() < width / 3  # top left

    picture = pictures.slice_picture(image, truth, truth, affine, "case")  # TensorBoard's: the same figure
    assert picture.dtype == np.uint8 and picture.shape[1] >= 900
    panel = picture[: int(0.86 * picture.shape[0]), : picture.shape[1] // 3]  # the first panel, above the key
    brain, tumor = np.argwhere(panel.max(-1) > 40), np.argwhere(green(panel))
    assert len(tumor) > 50
    top, left, bottom, right = *brain.min(0), *brain.max(0)
    assert tumor[:, 0].mean() < top + (bottom - top) / 3 and tumor[:, 1].mean() < left + (right - left) / 3
    for name, color in pictures.label_key([truth]) + pictures.error_key():  # the key's patches, in pure color
        assert np.all(picture == np.round(255 * np.array(color)), axis=-1).sum() > 20, name
    assert [name for name, _ in pictures.label_key([truth])] == ["edema (2)", "necrotic and non-enhancing core (1)"]


def test_tensorboard_is_imported_only_when_asked_and_named_when_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    hp = hyperparameters.load(overrides={"run_dir": tmp_path})
    assert training_log.TrainingLog(hp, 0, show=False).writer is None
    with pytest.raises(ValueError) as error:
        training_log.TrainingLog(hp.replace(tensorboard=True), 0, show=False)
    assert str(error.value) == ("tensorboard: True needs the tensorboard package: pip install tensorboard "
                                "(or set tensorboard: False)")


def run_in_kernel(client, code):
    """Execute code in the kernel -> (display_data contents, stdout text, stderr text)."""
    msg_id, displays, streams = client.execute(code), [], {"stdout": "", "stderr": ""}
    while True:
        message = client.get_iopub_msg(timeout=180)
        if message["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = message["msg_type"], message["content"]
        if kind == "error":
            pytest.fail(f"{content['ename']}: {content['evalue']}")
        if kind in ("display_data", "execute_result"):
            displays.append(content["data"])
        elif kind == "stream":
            streams[content["name"]] += content["text"]
        elif kind == "status" and content["execution_state"] == "idle":
            return displays, streams["stdout"], streams["stderr"]


def as_shown(text):
    """Lines as a console shows them: a carriage return starts the line afresh."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n")]


def test_train_in_an_ipython_kernel_shows_one_plot_per_epoch_and_clean_bars(tmp_path, tiny_prepared):
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (requirements-dev.txt)")
    manager = pytest.importorskip("jupyter_client.manager", reason="jupyter_client is not installed")
    settings = tmp_path / "hp.txt"
    settings.write_text("".join(f"{key}: {value}\n" for key, value in
                                {**TINY, "prepared_dir": tiny_prepared, "run_dir": tmp_path / "run"}.items()))
    kernel, client = manager.start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        shown, stdout, stderr = run_in_kernel(client, f"%matplotlib inline\n%run {REPO / 'train.py'} --hp {settings}")
        # the curves of the first k epochs, drawn and displayed by the same kernel, for comparison
        expected, _, _ = run_in_kernel(client, "\n".join([
            "import torch", "from bratsunet import training_log", "from matplotlib.figure import Figure",
            f"rows = torch.load({str(tmp_path / 'run' / 'checkpoint_last.pt')!r}, weights_only=True)['metrics']",
            "for k in range(1, len(rows) + 1):", "    display(training_log.draw_curves(rows[:k], Figure((13, 3.8))))"]))
    finally:
        client.stop_channels()
        kernel.shutdown_kernel(now=True)
    assert all("image/png" in data for data in shown)  # nothing empty, e.g. no <Figure size 640x480 with 0 Axes>
    pixels = [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["image/png"]))).convert("RGB")) for d in shown]
    assert len(pixels) == 2 and not np.array_equal(pixels[0], pixels[1])
    for picture, reference in zip(pixels, expected):
        assert np.array_equal(picture, np.asarray(Image.open(io.BytesIO(base64.b64decode(reference["image/png"])))
                                                  .convert("RGB")))
    lines = as_shown(stdout)
    # every bar went to stdout, where the line that reports its result replaces it: nothing on stderr (red in Spyder)
    assert stderr == "", stderr
    epoch_lines = [i for i, line in enumerate(lines) if line.startswith("epoch ")]
    assert [lines[i][:9] for i in epoch_lines] == ["epoch 1/2", "epoch 2/2"]
    assert all(" loss " in lines[i] and "%|" not in lines[i] for i in epoch_lines)
    assert epoch_lines[1] == epoch_lines[0] + 1  # no blank or bar lines
    assert [line.split(" into ")[0] for line in lines[epoch_lines[1] + 1:]] == ["predicted 2 validation case(s)", ""]


STAND_IN = '''"""A stand-in for PyCharm's plots tool window backend (module://backend_interagg, which ships inside
PyCharm, not on the package index): an Agg canvas whose show() hands each open figure's PNG to the IDE and then
closes the figure, as that backend does. Here the PNGs go into the folder $SHOWN_DIR, numbered."""
import itertools
import os

from matplotlib._pylab_helpers import Gcf
from matplotlib.backend_bases import FigureManagerBase
from matplotlib.backends.backend_agg import FigureCanvasAgg

numbers = itertools.count()


class FigureManager(FigureManagerBase):
    def show(self):
        self.canvas.figure.savefig(os.path.join(os.environ["SHOWN_DIR"], f"{next(numbers)}.png"), format="png")
        Gcf.destroy(self.num)


class FigureCanvas(FigureCanvasAgg):
    manager_class = FigureManager


def show(*args, **kwargs):
    for manager in Gcf.get_all_fig_managers():
        manager.show()
'''


def pycharm_run(tmp_path, tiny_prepared, env):
    """python train.py as PyCharm's Run button starts it (PYCHARM_HOSTED=1), with env -> (process, its run_dir)."""
    settings = tmp_path / "hp.txt"
    settings.write_text("".join(f"{key}: {value}\n" for key, value in
                                {**TINY, "prepared_dir": tiny_prepared, "run_dir": tmp_path / "run"}.items()))
    env = {**os.environ, "PYCHARM_HOSTED": "1", **env}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--hp", str(settings)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done, tmp_path / "run"


def test_pycharm_plots_tool_window_gets_one_picture_of_the_curves_per_epoch(tmp_path, tiny_prepared):
    (tmp_path / "pycharm_plots_stand_in.py").write_text(STAND_IN)
    shown = tmp_path / "shown"
    shown.mkdir()
    done, run_dir = pycharm_run(tmp_path, tiny_prepared, {
        "MPLBACKEND": "module://pycharm_plots_stand_in", "SHOWN_DIR": str(shown),
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    rows = checkpoints.load_checkpoint(run_dir / "checkpoint_last.pt")["metrics"]
    pictures_shown = sorted(shown.iterdir(), key=lambda path: int(path.stem))
    assert len(pictures_shown) == len(rows) == 2  # one per epoch, none empty or repeated
    for k, path in enumerate(pictures_shown, start=1):
        from matplotlib.figure import Figure
        expected = io.BytesIO()
        training_log.draw_curves(rows[:k], Figure((13, 3.8))).savefig(expected, format="png")
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")),
                              np.asarray(Image.open(expected).convert("RGB")))
    assert "epoch 2/2  loss" in done.stdout and "%|" not in done.stderr  # the bars on stdout, none in red


def test_pycharm_run_with_a_window_backend_draws_its_curves_without_waiting(tmp_path, tiny_prepared):
    """PyCharm without its plots tool window: a Tk window under Xvfb; training goes on while it is open."""
    missing = [tool for tool in ("Xvfb", "xdotool") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install xvfb xdotool; .ci/run installs them)")
    pytest.importorskip("tkinter", reason="this Python has no Tk")
    server = subprocess.Popen(["Xvfb", "-displayfd", "1", "-screen", "0", "1600x900x24", "-nolisten", "tcp"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        display = f":{server.stdout.readline().strip()}"
        done, run_dir = pycharm_run(tmp_path, tiny_prepared, {"DISPLAY": display, "MPLBACKEND": "TkAgg"})
    finally:
        server.terminate()
        server.wait(10)
    assert "epoch 2/2  loss" in done.stdout and (run_dir / "curves.png").is_file()
    assert "Traceback" not in done.stderr and "%|" not in done.stderr
