"""What training shows and leaves behind after every epoch: metrics.csv, curves.png and the plots pane,
TensorBoard and the printed line. train.py trains; this file reports.

Only the main process (rank 0) writes. Everything is rewritten from the metrics rows that checkpoints keep,
so a resumed run continues the same files: metrics.csv is written whole each epoch and curves.png with each
checkpoint_last.pt, and TensorBoard drops the steps after the resumed checkpoint (purge_step), so no epoch
appears twice.

Where matplotlib's inline backend shows figures as images (Spyder's IPython console, Jupyter, IPython with
--matplotlib=inline) each epoch's curves go to the plots pane as one image, without pyplot: a pyplot figure
would leave an empty one behind at the end of `%run`. With any other interactive backend (a window,
PyCharm's plots tool window) one pyplot figure is redrawn every epoch.
"""
import csv
import os
import sys

import numpy as np
import torch

from bratsunet import conventions, files
from bratsunet.manifest import read_manifest
from bratsunet.pictures import DPI, REGION_COLORS, slice_picture

METRIC_COLUMNS = ("epoch", "train_loss", "lr", "dice_WT", "dice_TC", "dice_ET", "dice_mean", "accuracy",
                  "skipped_steps", "seconds")


# ---------------------------------------------------------------- metrics.csv and the curves

def write_metrics_csv(rows, path):
    """Rewrite the whole file from the rows kept in the checkpoint: a resume never repeats or loses a row."""
    def write(tmp):
        with open(tmp, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(METRIC_COLUMNS)
            for row in rows:
                writer.writerow(["" if row[c] is None else f"{row[c]:.6g}" if isinstance(row[c], float) else row[c]
                                 for c in METRIC_COLUMNS])
    files.atomic_write(path, write)


def interactive_plots():
    """True in Spyder, PyCharm or IPython with a matplotlib backend that can show figures."""
    if not ("IPython" in sys.modules or os.environ.get("PYCHARM_HOSTED") or hasattr(sys, "ps1")):
        return False
    import matplotlib
    return matplotlib.get_backend().lower() not in ("agg", "pdf", "ps", "svg", "cairo", "template")


def inline_backend():
    """True where figures are shown as images in the console or plots pane (matplotlib's inline backend)."""
    import matplotlib
    return "inline" in matplotlib.get_backend().lower()


def draw_curves(rows, figure):
    """Training loss; Dice per region and mean Dice (= mean F1); voxel accuracy: three axes in figure."""
    axes = figure.subplots(1, 3)
    axes[0].plot([row["epoch"] for row in rows], [row["train_loss"] for row in rows], "o-", color="black",
                 label="training loss")
    validated = [row for row in rows if row["dice_mean"] is not None]
    epochs = [row["epoch"] for row in validated]
    for region in conventions.REGION_NAMES:
        axes[1].plot(epochs, [row[f"dice_{region}"] for row in validated], "o-", color=REGION_COLORS[region],
                     label=f"Dice {region}")
    axes[1].plot(epochs, [row["dice_mean"] for row in validated], "ko--", label="mean Dice (F1)")
    axes[2].plot(epochs, [row["accuracy"] for row in validated], "o-", color="dimgray", label="voxel accuracy")
    for axis, title in zip(axes, ("loss", "validation Dice (F1)", "validation accuracy")):
        axis.set(title=title, xlabel="epoch")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[1].set_ylim(0, 1)
    figure.tight_layout()
    return figure


def plot_curves(rows, path, show=False):
    """curves.png of the rows so far; with show, also in the plots pane (one image) or a window (redrawn)."""
    window = show and not inline_backend()
    if window:
        import matplotlib.pyplot as plt
        figure = plt.figure("training", figsize=(13, 3.8), clear=True)
    else:  # a plain Figure renders with Agg: no pyplot state, no GUI backend touched on a server or in a test
        from matplotlib.figure import Figure
        figure = Figure((13, 3.8))
    draw_curves(rows, figure)
    files.atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI))
    if window:
        plt.show(block=False)
        plt.pause(0.001)
    elif show:
        from IPython.display import display
        display(figure)


# ---------------------------------------------------------------- the console

def summary_line(row, hp, best, device):
    dice = "" if row["dice_mean"] is None else (
        "  Dice " + " ".join(f"{region} {row[f'dice_{region}']:.3f}" for region in conventions.REGION_NAMES)
        + f"  mean {row['dice_mean']:.3f}  accuracy {row['accuracy']:.4f}" + "  best" * best)
    skipped = f"  skipped {row['skipped_steps']}" if row["skipped_steps"] else ""
    memory = f"  {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB peak" if device.type == "cuda" else ""
    return (f"epoch {row['epoch']}/{hp.epochs}  loss {row['train_loss']:.4f}{dice}  lr {row['lr']:.2e}{skipped}"
            f"  {row['seconds']:.1f} s{memory}")


# ---------------------------------------------------------------- TensorBoard

def open_tensorboard(folder, first_epoch):
    """A SummaryWriter whose step is the epoch; steps from first_epoch on, left by an interrupted run, are
    purged. The package is needed only here."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("tensorboard: True needs the tensorboard package: pip install tensorboard "
                         "(or set tensorboard: False)") from None
    return SummaryWriter(str(folder), purge_step=first_epoch)


def add_to_tensorboard(writer, row, picture=None, tag=None):
    """One epoch's scalars, and the picture of a validation slice when the epoch was validated."""
    step = row["epoch"]
    writer.add_scalar("loss/train", row["train_loss"], step)
    writer.add_scalar("learning_rate", row["lr"], step)
    writer.add_scalar("skipped_steps", row["skipped_steps"], step)
    if row["dice_mean"] is not None:
        for region in (*conventions.REGION_NAMES, "mean"):
            writer.add_scalar(f"dice/{region}", row[f"dice_{region}"], step)
        writer.add_scalar("accuracy", row["accuracy"], step)
    if picture is not None:
        writer.add_image(tag, picture, step, dataformats="HWC")
    writer.flush()


# ---------------------------------------------------------------- the log of a run

class TrainingLog:
    """The per-epoch outputs of the main process, made once per run after run_dir exists."""

    def __init__(self, hp, completed_epochs, show):
        self.hp, self.show = hp, show
        meanings = [conventions.meaning(channel) for channel in hp.channel_names]  # flair, or 2023's t2f
        self.channel = meanings.index("flair") if "flair" in meanings else 0  # the image of the picture
        self.writer = open_tensorboard(hp.run_dir / "tensorboard", completed_epochs + 1) if hp.tensorboard else None
        self.cases = read_manifest(hp.prepared_dir)["cases"] if hp.tensorboard else {}  # their affines: orientation

    def to_tensorboard(self, row, volumes=None, pred=None):
        """The epoch's scalars, and with pred (the labels predicted for volumes[0]) its picture. Called before
        the epoch's checkpoint: a run stopped in between is resumed from the checkpoint before, whose
        purge_step drops this epoch's events, and logs them again."""
        if self.writer is None:
            return
        picture, tag = None, None
        if pred is not None:
            name, image, truth = volumes[0]  # (C, x, y, z), (x, y, z)
            picture = slice_picture(np.asarray(image[self.channel]), np.asarray(truth), pred,
                                    self.cases.get(name, {}).get("affine"), name, self.hp.data_format)
            tag = f"validation/{name}"
        add_to_tensorboard(self.writer, row, picture, tag)

    def write(self, rows, best, device, curves=True):
        """After the epoch's checkpoints: metrics.csv, the printed line, and with curves (when checkpoint_last.pt was
        written) curves.png and the plots pane."""
        write_metrics_csv(rows, self.hp.run_dir / "metrics.csv")
        if curves:
            plot_curves(rows, self.hp.run_dir / "curves.png", self.show)
        print(summary_line(rows[-1], self.hp, best, device))

    def close(self):
        if self.writer is not None:
            self.writer.close()
