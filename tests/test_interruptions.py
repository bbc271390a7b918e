"""Interruptions and repeatability: prepare and train killed with SIGKILL and run again, a full disk while
writing, and two runs with the same seed on the CPU.

The kills come at a known point without any test code in the scripts: the killed process runs the real
script's main() with one library function wrapped (np.save, training.train_epoch) so that it stalls there,
and the test kills it once a marker file shows it has arrived."""
import csv
import errno
import math
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch

import evaluate
import predict
import prepare_dataset
import train
from bratsunet import checkpoints, hyperparameters, network
from bratsunet.files import LOCK

from conftest import REPO

needs_sigkill = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX only")


# ---------------------------------------------------------------- helpers

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors run faster on one thread, and a busy machine cannot stall OpenMP's waiting threads.
    Runs compared bit for bit must use the same number of threads: the killed process gets one too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def start(code, marker, overrides):
    """python -c code MARKER key=value... in the repository; the code runs a script's main()."""
    arguments = [f"{key}={value}" for key, value in overrides.items()]
    return subprocess.Popen([sys.executable, "-c", code, str(marker), *arguments], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # as one_thread() below


def kill_when(process, marker, timeout=120):
    """SIGKILL process as soon as marker exists (the process made it and stalls)."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"exited ({process.returncode}) before the kill point:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the kill point was not reached in time")
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    assert process.returncode == -signal.SIGKILL


def files_of(folder):
    """{name: bytes} of every file in folder, hidden ones included."""
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def without_seconds(rows):
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def assert_same(a, b, where="checkpoint"):
    """Equal checkpoints: tensors bit for bit, other values exactly; timings and paths (hyperparameters) aside."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            if key not in ("seconds", "hyperparameters"):
                assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), f"{where}: {a!r} vs {b!r}"


def run_main(script, monkeypatch, overrides):
    """script.main() with key=value arguments -> the one-line message it exits with."""
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *(f"{k}={v}" for k, v in overrides.items())])
    with pytest.raises(SystemExit) as stop:
        script.main()
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def disk_full(write_partial):
    """A writer that writes a few bytes, then fails as a full disk does."""
    def writer(*args, **kwargs):
        write_partial(*args)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return writer


def partial_file(path):
    with open(path, "wb") as file:
        file.write(b"\0" * 100)


class FullDiskCsvWriter:
    """A csv writer whose first row fills the disk halfway through."""

    def __init__(self, file, *args, **kwargs):
        self.file = file

    def writerow(self, *rows):
        self.file.write("case,dice")
        self.file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    writeheader = writerows = writerow


# ---------------------------------------------------------------- prepare

PREPARE_STALLS_IN_A_WRITE = """
import sys, time
import numpy as np
import prepare_dataset

marker, save, calls = sys.argv[1], np.save, []

def save_then_stall(file, array, *args, **kwargs):  # the third array: half written, then the kill
    calls.append(file)
    if len(calls) == 3:
        with open(file, "wb") as out:
            out.write(b"\\x93NUMPY" + bytes(100))
        open(marker, "w").close()
        time.sleep(600)
    return save(file, array, *args, **kwargs)

np.save = save_then_stall
sys.argv = ["prepare_dataset.py"] + sys.argv[2:]
prepare_dataset.main()
"""


def prepare_settings(tiny_raw, prepared_dir, **changes):
    """The settings of conftest's tiny_prepared, into another folder."""
    return {"raw_data_dir": tiny_raw, "prepared_dir": prepared_dir, "num_workers": 0, "val_fraction": 0.34,
            "test_fraction": 0, **changes}


@needs_sigkill
def test_prepare_killed_while_writing_reruns_to_byte_identical_outputs(tiny_raw, tiny_prepared, tmp_path):
    prepared = tmp_path / "prepared"
    settings = prepare_settings(tiny_raw, prepared)
    process = start(PREPARE_STALLS_IN_A_WRITE, tmp_path / "stalled", settings)
    kill_when(process, tmp_path / "stalled")
    left = sorted(path.name for path in prepared.iterdir())
    assert "dataset.json" not in left and any(name.startswith(".") for name in left)  # killed mid-write
    assert "BraTS20_Training_001.json" in left  # the first case was done

    prepare_dataset.prepare_dataset(hyperparameters.load(overrides=settings))
    assert files_of(prepared) == files_of(tiny_prepared)  # same names, same bytes: nothing half-written is left


@pytest.mark.parametrize("writes", ["arrays", "manifest"])
def test_prepare_on_a_full_disk_stops_with_one_line_and_leaves_no_partial_file(tiny_raw, tmp_path, monkeypatch,
                                                                               writes):
    prepared = tmp_path / "prepared"
    if writes == "arrays":
        monkeypatch.setattr(np, "save", disk_full(lambda file, array: partial_file(file)))
        target = prepared / "BraTS20_Training_001.npy"
    else:  # the last write of the run: every case is done, the manifest cannot be written
        write_text = type(prepared).write_text
        monkeypatch.setattr(type(prepared), "write_text", lambda path, text: (
            write_text(path, text) if not path.name.endswith("dataset.json") else disk_full(partial_file)(path)))
        target = prepared / "dataset.json"
    message = run_main(prepare_dataset, monkeypatch, prepare_settings(tiny_raw, prepared))
    assert f"cannot write {target}" in message and "No space left on device" in message
    left = [path.name for path in prepared.iterdir() if path.name != LOCK]  # the lock file is no partial file
    assert not [name for name in left if name.startswith(".") or name == target.name], left
    if writes == "arrays":  # it stopped at the first failure instead of failing every case
        assert left == []


# ---------------------------------------------------------------- train

TRAIN_STALLS_IN_EPOCH_2 = """
import sys, time
import train
from bratsunet import training

marker, train_epoch = sys.argv[1], training.train_epoch

def stall_in_epoch_2(net, batches, *args):  # epoch 2: two steps taken, the kill comes while loading the third
    def batches_then_stall():
        for step, batch in enumerate(batches):
            if step == 2:
                open(marker, "w").close()
                time.sleep(600)
            yield batch
    epoch = args[7]
    return train_epoch(net, batches_then_stall() if epoch == 2 else batches, *args)

training.train_epoch = stall_in_epoch_2
sys.argv = ["train.py"] + sys.argv[2:]
train.main()
"""


def train_settings(prepared_dir, run_dir, **changes):
    return {"prepared_dir": prepared_dir, "run_dir": run_dir, "num_workers": 0, "features": "4, 8, 16",
            "patch_size": "16, 16, 16", "batch_size": 2, "epochs": 3, "steps_per_epoch": 3, "val_every": 2,
            "sw_batch_size": 4, "seed": 3, **changes}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_prepared):
    """A 3-epoch run without interruption -> its run_dir."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train.train(hyperparameters.load(overrides=train_settings(tiny_prepared, run_dir)))
    return run_dir


def assert_same_run(run_dir, reference):
    assert sorted(path.name for path in run_dir.iterdir()) == sorted(path.name for path in reference.iterdir())
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        assert_same(torch.load(run_dir / name, weights_only=True), torch.load(reference / name, weights_only=True),
                    name)
    rows = without_seconds(read_csv(run_dir / "metrics.csv"))
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]  # each epoch once
    assert rows == without_seconds(read_csv(reference / "metrics.csv"))


@needs_sigkill
def test_train_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(tiny_prepared, uninterrupted,
                                                                                 tmp_path):
    run_dir = tmp_path / "run"
    settings = train_settings(tiny_prepared, run_dir)
    process = start(TRAIN_STALLS_IN_EPOCH_2, tmp_path / "stalled", settings)
    kill_when(process, tmp_path / "stalled")
    assert torch.load(run_dir / "checkpoint_last.pt", weights_only=True)["epoch"] == 1
    assert [row["epoch"] for row in read_csv(run_dir / "metrics.csv")] == ["1"]

    train.train(hyperparameters.load(overrides={**settings, "resume": True}))
    assert_same_run(run_dir, uninterrupted)


def test_two_runs_with_the_same_seed_give_identical_prepared_files_checkpoints_and_metrics(
        tiny_raw, tiny_prepared, uninterrupted, tmp_path):
    prepared = tmp_path / "prepared"
    prepare_dataset.prepare_dataset(hyperparameters.load(overrides=prepare_settings(tiny_raw, prepared)))
    assert files_of(prepared) == files_of(tiny_prepared)
    train.train(hyperparameters.load(overrides=train_settings(tiny_prepared, tmp_path / "run")))
    assert_same_run(tmp_path / "run", uninterrupted)


@pytest.mark.parametrize("writes", ["checkpoint", "metrics"])
def test_train_on_a_full_disk_stops_with_one_line_and_keeps_the_last_good_checkpoint(tiny_prepared, tmp_path,
                                                                                      monkeypatch, writes):
    calls, torch_save, csv_writer = [], torch.save, csv.writer

    def save(state, path):  # the second checkpoint_last.pt (of epoch 2) fills the disk
        calls.append(path)
        if sum(str(p).endswith("-checkpoint_last.pt") for p in calls) > 1:
            disk_full(lambda state, path: partial_file(path))(state, path)
        return torch_save(state, path)

    def metrics_writer(file, *args, **kwargs):  # metrics.csv of epoch 2 fills the disk
        calls.append(file)
        return (FullDiskCsvWriter if len(calls) > 1 else csv_writer)(file, *args, **kwargs)

    if writes == "checkpoint":
        monkeypatch.setattr(torch, "save", save)
        target = "checkpoint_last.pt"
    else:
        monkeypatch.setattr(csv, "writer", metrics_writer)
        target = "metrics.csv"
    run_dir = tmp_path / "run"
    settings = train_settings(tiny_prepared, run_dir, epochs=2, steps_per_epoch=1, val_every=5)
    message = run_main(train, monkeypatch, settings)
    assert f"cannot write {run_dir / target}" in message and "No space left on device" in message
    assert not [path.name for path in run_dir.iterdir() if path.name.startswith(".")]  # no partial files
    assert torch.load(run_dir / "checkpoint_last.pt", weights_only=True)["epoch"] == (1 if writes == "checkpoint"
                                                                                      else 2)
    assert [row["epoch"] for row in read_csv(run_dir / "metrics.csv")] == ["1"]


# ---------------------------------------------------------------- predict and evaluate

def test_predict_on_a_full_disk_stops_with_one_line_and_leaves_no_partial_file(tiny_raw, tmp_path, monkeypatch):
    hp = hyperparameters.load(overrides={"features": "2, 4", "patch_size": "32, 32, 32"})
    torch.manual_seed(0)
    checkpoints.save_checkpoint({"model_args": network.model_args(hp), "model": network.build_model(hp).state_dict(),
                           "hyperparameters": hp.to_dict()}, tmp_path / "tiny.pt")
    calls = []
    monkeypatch.setattr(nib, "save", disk_full(lambda image, path: calls.append(path) or partial_file(path)))
    out = tmp_path / "predictions"
    message = run_main(predict, monkeypatch, {"predict_input_dir": tiny_raw, "checkpoint": tmp_path / "tiny.pt",
                                              "prediction_dir": out, "precision": "fp32"})
    assert f"cannot write {out / 'BraTS20_Training_001.nii.gz'}" in message and "No space left" in message
    assert len(calls) == 1 and list(out.iterdir()) == []  # stopped at the first failure, nothing left


def test_evaluate_on_a_full_disk_stops_with_one_line_and_leaves_no_partial_file(tiny_raw, tmp_path, monkeypatch):
    (tmp_path / "pred").mkdir()
    seg = nib.load(str(tiny_raw / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii"))
    nib.save(seg, str(tmp_path / "pred" / "BraTS20_Training_001.nii.gz"))
    monkeypatch.setattr(csv, "DictWriter", FullDiskCsvWriter)
    message = run_main(evaluate, monkeypatch, {"prediction_dir": tmp_path / "pred", "raw_data_dir": tiny_raw,
                                               "run_dir": tmp_path / "run"})
    assert f"cannot write {tmp_path / 'pred' / 'evaluation.csv'}" in message and "No space left" in message
    assert not [path.name for path in (tmp_path / "pred").iterdir() if "evaluation.csv" in path.name]
