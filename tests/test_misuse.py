"""The pipeline used as a careless user, a Mac or Windows user and a shared server use it: overlapping
folders, settings that disagree with the prepared data, trained runs in the way, diverging weights,
archive leftovers, link loops, read-only folders, odd file names. Each gives one clear line or simply
works; nothing is lost. (The settings file's encodings, `#` rule and ranges: test_hyperparameters.py;
broken intensities: the BREAKS table of test_reliability.py.)"""
import contextlib
import csv
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
import predict
import prepare_dataset
import rendering
import train
from bratsunet import evaluation, hyperparameters, inference, network, pictures, training, training_log
from bratsunet.cases import CaseError, find_cases, prediction_path
from bratsunet.files import TEMPORARY, sole_writer
from bratsunet.manifest import read_manifest

from conftest import REPO
from test_reliability import SOURCE, copy_case, copy_label_map, run_main, save_tiny_checkpoint
from test_reliability import one_thread  # noqa: F401  (its autouse fixture: one thread for this module too)

CASES = ["BraTS20_Training_001", "BraTS20_Training_002"]


def tiny_train_settings(prepared, run_dir, **changes):
    return {"prepared_dir": prepared, "run_dir": run_dir, "num_workers": 0, "features": "2, 4",
            "patch_size": "16, 16, 16", "epochs": 1, "steps_per_epoch": 1, "sw_batch_size": 4, **changes}


def link(path, target):
    """A symbolic link, or a skip where links need privileges (Windows without developer mode)."""
    try:
        path.symlink_to(target, target_is_directory=target.is_dir())
    except OSError as error:
        pytest.skip(f"cannot make symbolic links here ({error})")


@contextlib.contextmanager
def read_only(folder):
    """folder made read-only: by its mode, and for root (whom modes do not stop) by the immutable attribute."""
    folder.chmod(0o555)
    immutable = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("chattr")
    if immutable:
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    try:
        with contextlib.suppress(OSError):
            (folder / "probe").touch()
        if (folder / "probe").exists():
            (folder / "probe").unlink()
            pytest.skip("no way to make a folder read-only here")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


# ---------------------------------------------------------------- 1: predictions are never their own truth

@pytest.mark.parametrize("layout", ["same folder", "predictions inside", "truth inside", "a link to the truth",
                                    "predict_input_dir"])
def test_evaluate_refuses_prediction_dir_overlapping_the_ground_truth(tiny_raw, tmp_path, monkeypatch, layout):
    truth = tmp_path / "truth"  # a folder of label maps: read as predictions too, it would score Dice 1 everywhere
    truth.mkdir()
    copy_label_map(tiny_raw / SOURCE / f"{SOURCE}_seg.nii", truth / f"{SOURCE}.nii.gz")
    predictions = {"same folder": truth, "predictions inside": truth / "predictions", "truth inside": tmp_path,
                   "a link to the truth": tmp_path / "link", "predict_input_dir": truth}[layout]
    if layout == "a link to the truth":
        link(predictions, truth)
    predictions.mkdir(exist_ok=True)
    copy_label_map(tiny_raw / SOURCE / f"{SOURCE}_seg.nii", predictions / f"{SOURCE}.nii.gz")
    settings = {"raw_data_dir": tiny_raw if layout == "predict_input_dir" else truth,
                "prediction_dir": predictions, "run_dir": tmp_path / "run"}
    if layout == "predict_input_dir":
        settings["predict_input_dir"] = truth
    message = run_main(evaluate, monkeypatch, *settings.items())
    setting = "predict_input_dir" if layout == "predict_input_dir" else "raw_data_dir"
    assert f"prediction_dir {predictions}" in message and f"{setting} {truth}" in message and "overlap" in message
    assert not (tmp_path / "run").exists()


def test_a_prediction_that_is_the_truth_file_itself_is_not_evaluated(tiny_raw, tmp_path):
    (tmp_path / "pred").mkdir()
    link(tmp_path / "pred" / f"{SOURCE}.nii", tiny_raw / SOURCE / f"{SOURCE}_seg.nii")
    copy_label_map(tiny_raw / CASES[1] / f"{CASES[1]}_seg.nii", tmp_path / "pred" / f"{CASES[1]}.nii.gz")
    rows, not_evaluated = evaluation.evaluate_folders(tmp_path / "pred", tiny_raw, ("flair", "t1", "t1ce", "t2"),
                                                    "seg")
    assert [row["case"] for row in rows] == [CASES[1]]
    assert "is the ground truth" in not_evaluated[SOURCE] and "\n" not in not_evaluated[SOURCE]


# ---------------------------------------------------------------- 2, 3, 6, 16, 17: train's start-up checks

@pytest.mark.parametrize("changes, expected", [
    ({"channel_names": "t2, t1ce, t1, flair"}, "channel_names flair, t1, t1ce, t2 (prepared) vs t2, t1ce, t1, flair"),
    ({"channel_names": "flair, t1, t1ce"}, "channel_names flair, t1, t1ce, t2 (prepared) vs flair, t1, t1ce (now)"),
    ({"crop_margin": 3}, "crop_margin 0 (prepared) vs 3 (now)"),
    ({"patch_size": "30, 30, 30", "features": "2, 4, 8"},  # 2 poolings: sides must be multiples of 4
     "patch_size 30, 30, 30: side x is 30, not a multiple of 4"),
], ids=["channel order", "three channels", "crop margin", "patch size"])
def test_train_refuses_settings_that_do_not_fit_before_making_run_dir(tiny_prepared, tmp_path, monkeypatch, changes,
                                                                      expected):
    message = run_main(train, monkeypatch, *tiny_train_settings(tiny_prepared, tmp_path / "run", **changes).items())
    assert expected in message
    assert "patch_size" in changes or str(tiny_prepared / "dataset.json") in message
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_run_dir_holding_a_trained_run_unless_resumed_or_overwritten(tiny_prepared, tmp_path,
                                                                                   monkeypatch):
    run_dir = tmp_path / "run"
    settings = tiny_train_settings(tiny_prepared, run_dir)
    train.train(hyperparameters.load(overrides=settings))
    before = {name: (run_dir / name).read_bytes() for name in training.RUN_FILES}
    message = run_main(train, monkeypatch, *settings.items())
    assert f"{run_dir} holds a trained run" in message and "resume=True" in message and "overwrite=True" in message
    assert {name: (run_dir / name).read_bytes() for name in training.RUN_FILES} == before  # nothing touched
    plot = training_log.plot_curves

    def stop_after_epoch_1(rows, path, show=False):  # the new run interrupted before its first validation
        plot(rows, path, show)
        raise KeyboardInterrupt

    monkeypatch.setattr(training_log, "plot_curves", stop_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train.train(hyperparameters.load(overrides={**settings, "overwrite": True, "epochs": 3, "val_every": 2}))
    assert not (run_dir / "checkpoint_best.pt").exists()  # the old run's best is gone, not mixed with the new run
    assert torch.load(run_dir / "checkpoint_last.pt", weights_only=True)["hyperparameters"]["epochs"] == 3


def test_weights_that_become_nan_stop_training_and_keep_the_last_good_checkpoints(tiny_prepared, tmp_path,
                                                                                  monkeypatch):
    train_epoch = training.train_epoch

    def poisoned_in_epoch_2(net, *args):  # as a learning rate far too high would leave them
        result = train_epoch(net, *args)
        if args[8] == 2:
            with torch.no_grad():
                next(net.parameters()).fill_(float("nan"))
        return result

    monkeypatch.setattr(training, "train_epoch", poisoned_in_epoch_2)
    run_dir = tmp_path / "run"
    message = run_main(train, monkeypatch, *tiny_train_settings(tiny_prepared, run_dir, epochs=3).items())
    assert "epoch 2: the weights became NaN or Inf (encoders.0.0.weight)" in message
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        checkpoint = torch.load(run_dir / name, weights_only=True)
        assert checkpoint["epoch"] == 1 and all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_predict_refuses_nan_weights_and_never_writes_a_nan_prediction(tiny_raw, tmp_path, monkeypatch):
    path = save_tiny_checkpoint(tmp_path / "nan.pt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model"]["heads.0.bias"][:] = float("nan")
    torch.save(checkpoint, path)
    message = run_main(predict, monkeypatch, ("predict_input_dir", tiny_raw), ("checkpoint", path),
                       ("prediction_dir", tmp_path / "p"))
    assert f"{path}: weights hold NaN or Inf (heads.0.bias)" in message
    hp = hyperparameters.load(overrides={"features": "2, 4", "patch_size": "32, 32, 32", "prediction_dir":
                                         tmp_path / "p", "precision": "fp32"})
    net = network.build_model(hp).eval()
    with torch.no_grad():
        net.heads[0].bias.fill_(float("nan"))  # handed over directly, as train's validation does
    cases, _ = find_cases(tiny_raw, hp.channel_names, hp.seg_channel_name)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert inference.predict_cases(hp, cases[:1], net) == []
    assert "NaN or Inf probabilities; nothing written" in output.getvalue() and not list((tmp_path / "p").iterdir())


def test_a_read_only_run_dir_is_refused_before_the_first_epoch(tiny_prepared, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.setattr(training, "train_epoch", lambda *args: pytest.fail("an epoch started"))
    with read_only(run_dir):
        message = run_main(train, monkeypatch, *tiny_train_settings(tiny_prepared, run_dir).items())
    assert f"{run_dir}: cannot write into run_dir" in message


def test_checkpoints_get_the_permissions_of_the_umask(tmp_path):
    if os.name == "nt":
        pytest.skip("no umask on Windows")
    umask = os.umask(0o002)  # a group that shares runs
    try:
        save_tiny_checkpoint(tmp_path / "shared.pt")
    finally:
        os.umask(umask)
    assert (tmp_path / "shared.pt").stat().st_mode & 0o777 == 0o664


# ---------------------------------------------------------------- 7, 8, 16: prepare's folder

def test_prepare_removes_only_its_own_temporary_files(tiny_raw, tmp_path):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / ".tmp_notes.txt").write_text("a user's notes")
    (prepared / ".tmp").mkdir()
    (prepared / f".tmp4242-{SOURCE}.npy").write_bytes(b"half written by a killed run")
    hp = hyperparameters.load(overrides={"raw_data_dir": tiny_raw, "prepared_dir": prepared, "num_workers": 0,
                                         "val_fraction": 0.34})
    prepare_dataset.prepare_dataset(hp)
    assert (prepared / ".tmp_notes.txt").read_text() == "a user's notes" and (prepared / ".tmp").is_dir()
    assert not [path.name for path in prepared.iterdir() if TEMPORARY.fullmatch(path.name)]


def test_a_second_prepare_on_the_same_folder_stops_and_touches_nothing(tiny_raw, tmp_path, monkeypatch):
    prepared = tmp_path / "prepared"
    with sole_writer(prepared, "prepared_dir"):  # the first run, busy writing a case
        (prepared / f".tmp1-{SOURCE}.npy").write_bytes(b"being written")
        message = run_main(prepare_dataset, monkeypatch, ("raw_data_dir", tiny_raw), ("prepared_dir", prepared))
        assert f"{prepared}: another run is writing into this prepared_dir" in message
        assert (prepared / f".tmp1-{SOURCE}.npy").read_bytes() == b"being written"
    # the lock goes with its holder (the operating system drops it, also when the holder is killed)
    hp = hyperparameters.load(overrides={"raw_data_dir": tiny_raw, "prepared_dir": prepared, "num_workers": 0})
    assert prepare_dataset.prepare_dataset(hp)["cases"]


def test_read_only_prepared_dir_empty_is_refused_and_prepared_is_rechecked(tiny_raw, tiny_prepared, tmp_path,
                                                                          monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with read_only(empty):
        message = run_main(prepare_dataset, monkeypatch, ("raw_data_dir", tiny_raw), ("prepared_dir", empty))
    assert f"{empty}: cannot write into prepared_dir" in message
    copy = tmp_path / "copy"
    shutil.copytree(tiny_prepared, copy)  # a finished dataset on a read-only share, checked again
    before = {path.name: path.stat().st_mtime_ns for path in copy.iterdir()}
    hp = hyperparameters.load(overrides={"raw_data_dir": tiny_raw, "prepared_dir": copy, "num_workers": 0,
                                         "val_fraction": 0.34, "test_fraction": 0})  # tiny_prepared's settings
    with read_only(copy):
        manifest = prepare_dataset.prepare_dataset(hp)
    assert manifest == read_manifest(tiny_prepared)
    assert {path.name: path.stat().st_mtime_ns for path in copy.iterdir()} == before


# ---------------------------------------------------------------- 9, 10, 17: finding cases

def test_archive_and_file_browser_leftovers_are_ignored(tiny_raw, tmp_path):
    raw = tmp_path / "data"  # a lowercase top folder: __MACOSX sorts before it
    for name in CASES:
        folder = copy_case(tiny_raw / name, raw / "data" / name, name)
        shadow = raw / "__MACOSX" / "data" / name  # the zip's resource forks: tiny files named like the data
        shadow.mkdir(parents=True)
        for path in folder.iterdir():
            (shadow / f"._{path.name}").write_bytes(b"\0\5\26\7Mac OS X")
            (folder / f"._{path.name}").write_bytes(b"\0\5\26\7Mac OS X")
        for junk in (".DS_Store", "Thumbs.db", "desktop.ini"):
            (folder / junk).write_bytes(b"\0")
    cases, problems = find_cases(raw, ("flair", "t1", "t1ce", "t2"), "seg")
    assert [case.name for case in cases] == CASES and problems == []
    assert all(case.folder.parent == raw / "data" and case.seg_path for case in cases)


FIND_IN_A_SUBPROCESS = """
import sys
from bratsunet.cases import find_cases
cases, problems = find_cases(sys.argv[1], ("flair", "t1", "t1ce", "t2"), "seg")
print(sorted(case.name for case in cases), problems, max(len(str(case.folder)) for case in cases))
"""


def test_link_loops_are_walked_once(tiny_raw, tmp_path):
    raw = tmp_path / "raw"
    for name in CASES:
        copy_case(tiny_raw / name, raw / name, name)
    link(raw / "again", raw)  # two ways back up: the walk would double at every level
    link(raw / "and_again", raw)
    link(raw / CASES[0] / "loop", raw / CASES[0])
    shared = tmp_path / "shared" / "Case-shared"  # a link to data elsewhere is still followed
    copy_case(tiny_raw / SOURCE, shared, "Case-shared")
    link(raw / "shared", shared.parent)
    found = subprocess.run([sys.executable, "-c", FIND_IN_A_SUBPROCESS, str(raw)], cwd=REPO, capture_output=True,
                           text=True, timeout=60)  # a regression hangs: the timeout ends it
    longest = max(len(str(raw / name)) for name in CASES + ["shared/Case-shared"])  # no path through a loop
    assert found.stdout.strip() == f"{sorted(CASES + ['Case-shared'])} [] {longest}", found.stderr


def test_raw_data_dir_naming_a_file_says_so(tiny_raw, tmp_path, monkeypatch):
    message = run_main(prepare_dataset, monkeypatch, ("raw_data_dir", tiny_raw / SOURCE / f"{SOURCE}_t1.nii"),
                       ("prepared_dir", tmp_path / "p"))
    assert message.endswith(f"{SOURCE}_t1.nii: raw_data_dir is a file, not a folder")


# ---------------------------------------------------------------- 12, 17: evaluate's file names

def test_both_nii_and_nii_gz_of_a_case_are_reported_not_guessed(tiny_raw, tmp_path, capsys):
    (tmp_path / "pred").mkdir()
    for name in CASES:
        copy_label_map(tiny_raw / name / f"{name}_seg.nii", tmp_path / "pred" / f"{name}.nii.gz")
    copy_label_map(tiny_raw / CASES[0] / f"{CASES[0]}_seg.nii", tmp_path / "pred" / f"{CASES[0]}.nii")
    hp = hyperparameters.load(overrides={"raw_data_dir": tiny_raw, "prediction_dir": tmp_path / "pred",
                                         "run_dir": tmp_path / "run"})
    rows = evaluate.evaluate(hp)
    assert [row["case"] for row in rows] == [CASES[1]]
    assert f"not evaluated {CASES[0]}: {tmp_path / 'pred'}" in capsys.readouterr().out
    with pytest.raises(CaseError, match=f"both {CASES[0]}.nii and {CASES[0]}.nii.gz; remove one"):
        prediction_path(tmp_path / "pred", CASES[0])


def test_a_case_folder_name_that_is_not_utf8_is_evaluated_and_printed(tiny_raw, tmp_path, monkeypatch, capsys):
    try:
        name = os.fsdecode(b"Case-\xe9t\xe9")  # Latin-1 bytes from an old archive: surrogates in Python
        copy_case(tiny_raw / SOURCE, tmp_path / "raw" / name, name)
    except (OSError, UnicodeError):
        pytest.skip("this file system takes only valid names")
    (tmp_path / "pred").mkdir()
    copy_label_map(tiny_raw / SOURCE / f"{SOURCE}_seg.nii", tmp_path / "pred" / f"{name}.nii.gz")
    copy_label_map(tiny_raw / SOURCE / f"{SOURCE}_seg.nii", tmp_path / "pred" / os.fsdecode(b"Case-\xff.nii.gz"))
    monkeypatch.setattr(sys, "argv", ["evaluate.py", f"raw_data_dir={tmp_path / 'raw'}",
                                      f"prediction_dir={tmp_path / 'pred'}", f"run_dir={tmp_path / 'run'}"])
    evaluate.main()  # capsys' stream refuses surrogates as a terminal in a UTF-8 locale does
    printed = capsys.readouterr().out
    assert "1 case(s) evaluated" in printed and "not evaluated Case-\\udcff: no ground truth" in printed
    with open(tmp_path / "pred" / "evaluation.csv", newline="", encoding="utf-8") as file:
        assert [row["case"] for row in csv.DictReader(file)] == ["Case-\\udce9t\\udce9"]


# ---------------------------------------------------------------- 11: rendering

def test_slice_overlay_of_a_case_without_tumor_or_without_positive_voxels(tmp_path):
    image = np.zeros((24, 24, 16), np.float32)
    image[4:20, 4:20, 4:12] = 100.0
    empty = np.zeros(image.shape, np.uint8)
    for name, brain in (("no_tumor", image), ("no_positive_voxel", -image), ("all_zero", 0 * image)):
        pictures.slice_overlay_png(brain, empty, empty, tmp_path / f"{name}.png", title=name)
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


def test_render_output_naming_a_folder_writes_into_it(tiny_raw, tmp_path):
    (tmp_path / "pred").mkdir()
    copy_label_map(tiny_raw / SOURCE / f"{SOURCE}_seg.nii", tmp_path / "pred" / f"{SOURCE}.nii.gz")
    (tmp_path / "pictures").mkdir()
    hp = hyperparameters.load(overrides={"raw_data_dir": tiny_raw, "prediction_dir": tmp_path / "pred",
                                         "render_output": tmp_path / "pictures", "rendering_sample_name": SOURCE})
    assert rendering.render(hp) == tmp_path / "pictures" / f"{SOURCE}_render.png"
    assert sorted(path.name for path in (tmp_path / "pictures").iterdir()) == [
        f"{SOURCE}_render.png", f"{SOURCE}_render_slices.png"]
