"""What a careless, Mac, Windows or shared-server user meets beyond the broken files of test_reliability.py: a full
disk that numpy or torch.save report without an errno, predictions among the ground truth or of other cases,
a misnamed segmentation, two trainings in one folder, a resume with other epochs or learning rate, checkpoint
names with brackets or commas, unsafe pickles, damaged prepared arrays, infinite lesion-wise distances, an
ensemble of some folds, a device this PyTorch lacks, a download not yet unpacked. (The ONNX model that must
stand for its checkpoint: test_export.py.)"""
import csv
import gzip
import math
import os
import pickle
import shutil
import warnings
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

import crossval
import evaluate
import predict
import prepare_dataset
import rendering
import train
from bratsunet import cases, devices, hyperparameters, inference, training
from bratsunet.evaluation import statistics_of
from bratsunet.files import LOCK, sole_writer
from bratsunet.manifest import read_manifest

from test_interruptions import prepare_settings, read_csv, train_settings
from test_reliability import SOURCE, copy_case, copy_label_map, run_main, save_tiny_checkpoint
from test_reliability import one_thread  # noqa: F401  (its autouse fixture: one thread for this module too)


def main_message(script, monkeypatch, **overrides):
    return run_main(script, monkeypatch, *overrides.items())


# ---------------------------------------------------------------- a full disk that says no errno

def numpy_short_write(file, array, *args, **kwargs):
    """np.save on a disk that fills up in the middle of the array: numpy's tofile reports the short write
    as an OSError without errno, in these words."""
    with open(file, "wb") as out:
        out.write(b"\x93NUMPY" + bytes(100))
    raise OSError(f"{array.nbytes} requested and {array.nbytes // 3} written")


@pytest.mark.parametrize("room", ["no room left", "room left"])
def test_prepare_stops_at_a_failed_write_without_errno_and_writes_no_split(tiny_raw, tmp_path, monkeypatch, room):
    prepared = tmp_path / "prepared"
    monkeypatch.setattr(np, "save", numpy_short_write)
    if room == "no room left":  # as the disk looks once the partial file has taken the last blocks
        monkeypatch.setattr(shutil, "disk_usage", lambda folder: SimpleNamespace(total=10 ** 9, used=10 ** 9, free=0))
    message = main_message(prepare_dataset, monkeypatch, **prepare_settings(tiny_raw, prepared))
    target = prepared / "BraTS20_Training_001.npy"
    if room == "no room left":
        assert message == f"error: cannot write {target}: No space left on device; the cases prepared so far are " \
                          "kept, run again once there is room"
    else:  # the reason numpy gave, and still the end of the run
        assert message.startswith(f"error: cannot write {target}: ") and "requested and" in message
        assert message.endswith(" written; the cases prepared so far are kept")
    assert sorted(path.name for path in prepared.iterdir()) == []  # no dataset.json of a partial split, no lock


def test_train_reports_torch_saves_failed_zip_write_as_a_full_disk(tiny_prepared, tmp_path, monkeypatch):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    torch_save, saved = torch.save, []

    def save_to_a_full_disk(state, path):  # the second checkpoint_last.pt: torch's own zip writer meets a full disk
        saved.append(str(path))
        last = sum(name.endswith("-checkpoint_last.pt") for name in saved)
        return torch_save(state, "/dev/full" if last == 2 else path)

    monkeypatch.setattr(torch, "save", save_to_a_full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: SimpleNamespace(total=10 ** 9, used=10 ** 9, free=0))
    run_dir = tmp_path / "run"
    message = main_message(train, monkeypatch, **train_settings(tiny_prepared, run_dir, epochs=2, steps_per_epoch=1,
                                                                val_every=5))
    assert message == f"error: cannot write {run_dir / 'checkpoint_last.pt'}: No space left on device"
    assert torch.load(run_dir / "checkpoint_last.pt", weights_only=True)["epoch"] == 1  # the last good one
    assert not [path.name for path in run_dir.iterdir() if path.name.startswith(".")]


# ---------------------------------------------------------------- evaluate: the expected cases, one rule for the truth

def test_evaluate_scores_only_the_test_split_and_lists_the_other_predictions(tiny_raw, tmp_path, monkeypatch,
                                                                             capsys):
    settings = prepare_settings(tiny_raw, tmp_path / "prepared", test_fraction=0.34)
    manifest = prepare_dataset.prepare_dataset(hyperparameters.load(overrides=settings))
    test = sorted(name for name, case in manifest["cases"].items() if case["split"] == "test")
    others = sorted(name for name, case in manifest["cases"].items() if case["split"] != "test")
    assert test and others
    (tmp_path / "pred").mkdir()
    for name in test + others:  # test, training and validation predictions in one folder
        copy_label_map(tiny_raw / name / f"{name}_seg.nii", tmp_path / "pred" / f"{name}.nii.gz")
    hp = hyperparameters.load(overrides={**settings, "prediction_dir": tmp_path / "pred", "run_dir": tmp_path / "run"})
    capsys.readouterr()
    rows = evaluate.evaluate(hp)
    assert [row["case"] for row in rows] == test
    out = capsys.readouterr().out
    assert f"{len(test)} case(s) evaluated" in out and "the cases expected: the test split of dataset.json" in out
    assert f"ignored {len(others)} prediction(s) of other cases, not part of this result: {', '.join(others)}" in out
    with open(hp.prediction_dir / "evaluation.csv", newline="") as file:
        assert [row["case"] for row in csv.DictReader(file)] == test


@pytest.mark.parametrize("case", ["BraTS20_Training_355", "Segmentation-Study-355"])  # a name holding "seg" too
def test_a_misnamed_segmentation_is_found_by_every_script_by_one_rule(tiny_raw, tmp_path, monkeypatch, case):
    raw = tmp_path / "raw"
    for name in ("BraTS20_Training_002", "BraTS20_Training_004"):
        copy_case(tiny_raw / name, raw / name, name)
    folder = copy_case(tiny_raw / SOURCE, raw / case, case)
    seg = folder / f"{case}_seg.nii"  # as BraTS 2020 ships case 355
    (folder / "W39_1998.09.19_Segm.nii.gz").write_bytes(gzip.compress(seg.read_bytes()))
    seg.unlink()
    settings = {**prepare_settings(raw, tmp_path / "prepared", test_fraction=0, val_fraction=0),
                "prediction_dir": tmp_path / "pred", "run_dir": tmp_path / "run", "predict_input_dir": raw}
    hp = hyperparameters.load(overrides=settings)
    manifest = prepare_dataset.prepare_dataset(hp)
    assert manifest["cases"][case]["seg"] and not manifest["unlabeled"]
    truth = cases.find_ground_truth([raw], hp.channel_names, hp.seg_channel_name)  # evaluate's and crossval's
    assert truth[case] == folder / "W39_1998.09.19_Segm.nii.gz"
    assert rendering.find_case(hp, case).seg_path == truth[case]
    (tmp_path / "pred").mkdir()
    copy_label_map(tiny_raw / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii",
                   tmp_path / "pred" / "BraTS20_Training_002.nii.gz")
    rows = {row["case"]: row for row in evaluate.evaluate(hp)}  # the case has no prediction: a failure
    assert sorted(rows) == sorted([case, "BraTS20_Training_002", "BraTS20_Training_004"])
    assert rows[case]["dice_WT"] == 0 and rows["BraTS20_Training_002"]["dice_WT"] == 1
    copy_label_map(folder / "W39_1998.09.19_Segm.nii.gz", tmp_path / "pred" / f"{case}.nii.gz")
    assert {row["case"]: row for row in evaluate.evaluate(hp)}[case]["dice_WT"] == 1  # with one: scored on it


def test_an_expected_case_without_ground_truth_or_prediction_is_named(tiny_raw, tmp_path, monkeypatch, capsys):
    raw = tmp_path / "raw"
    for name in (SOURCE, "BraTS20_Training_002"):
        copy_case(tiny_raw / name, raw / name, name)
    (raw / SOURCE / f"{SOURCE}_seg.nii").rename(raw / SOURCE / f"{SOURCE}_labels.nii")  # not found as its truth
    (tmp_path / "pred").mkdir()
    copy_label_map(tiny_raw / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii",
                   tmp_path / "pred" / "BraTS20_Training_002.nii.gz")
    hp = hyperparameters.load(overrides={"raw_data_dir": raw, "predict_input_dir": raw, "run_dir": tmp_path / "run",
                                         "prediction_dir": tmp_path / "pred", "prepared_dir": tmp_path / "none"})
    assert [row["case"] for row in evaluate.evaluate(hp)] == ["BraTS20_Training_002"]
    out = capsys.readouterr().out
    assert f"not evaluated {SOURCE}: {raw / SOURCE}: no segmentation (*_seg.nii[.gz]); not recognized: " \
           f"{SOURCE}_labels.nii (nor a prediction)" in out


@pytest.mark.parametrize("where", ["predict_input_dir itself", "inside predict_input_dir", "a case folder",
                                   "raw_data_dir, its test split"])
def test_predict_refuses_to_write_among_the_ground_truth(tiny_raw, tiny_prepared, tmp_path, monkeypatch, where):
    raw = tmp_path / "raw"
    shutil.copytree(tiny_raw, raw)
    before = sorted(path.relative_to(raw) for path in raw.rglob("*"))
    out = {"predict_input_dir itself": raw, "inside predict_input_dir": raw / "predictions",
           "a case folder": raw / SOURCE, "raw_data_dir, its test split": raw / "predictions"}[where]
    settings = {"checkpoint": save_tiny_checkpoint(tmp_path / "tiny.pt"), "prediction_dir": out,
                "prepared_dir": tiny_prepared, "precision": "fp32"}
    if where == "raw_data_dir, its test split":
        settings["raw_data_dir"], setting = raw, "raw_data_dir"
    else:  # the cases of another folder, the truth of the test split elsewhere
        settings["raw_data_dir"], settings["predict_input_dir"], setting = tiny_raw, raw, "predict_input_dir"
    message = main_message(predict, monkeypatch, **settings)
    assert message == f"error: prediction_dir {out} and {setting} {raw} overlap: predictions and ground truth must " \
                      "be in separate folders"
    assert sorted(path.relative_to(raw) for path in raw.rglob("*")) == before  # nothing written


# ---------------------------------------------------------------- train: one run per folder, a resume with new settings

@pytest.mark.parametrize("folds", [1, 2])
def test_a_second_training_in_the_same_run_folder_stops_at_once(tiny_raw, tiny_prepared, tmp_path, monkeypatch,
                                                                folds):
    prepared = tiny_prepared
    if folds > 1:
        prepared = tmp_path / "prepared"
        prepare_dataset.prepare_dataset(hyperparameters.load(overrides=prepare_settings(tiny_raw, prepared,
                                                                                        num_folds=2)))
    run_dir = tmp_path / "run"
    folder = run_dir if folds == 1 else run_dir / "fold_1"
    settings = train_settings(prepared, run_dir, num_folds=folds, fold=folds - 1, epochs=1, steps_per_epoch=1)
    with sole_writer(folder, "run_dir"):  # the first run, busy training
        (folder / "checkpoint_last.pt").write_bytes(b"the first run's")
        message = main_message(train, monkeypatch, **settings)
        assert message == f"error: {folder}: another run is writing into this run_dir; run again once it has finished"
        assert (folder / "checkpoint_last.pt").read_bytes() == b"the first run's"
        (folder / "checkpoint_last.pt").unlink()
    train.train(hyperparameters.load(overrides=settings))  # once the first has finished
    assert (folder / "checkpoint_last.pt").is_file() and not (folder / LOCK).exists()  # the lock went with the run


def test_a_resume_with_more_epochs_and_another_learning_rate_continues_the_schedule(tiny_prepared, tmp_path, capsys):
    settings = train_settings(tiny_prepared, tmp_path / "run", epochs=2, steps_per_epoch=2, val_every=9)
    train.train(hyperparameters.load(overrides=settings))
    train.train(hyperparameters.load(overrides={**settings, "resume": True, "epochs": 4, "learning_rate": 1e-3}))
    rates = [float(row["lr"]) for row in read_csv(tmp_path / "run" / "metrics.csv")]
    first = hyperparameters.load(overrides=settings)
    then = first.replace(epochs=4, learning_rate=1e-3)
    expected = [first.learning_rate * training.lr_factor(0, first), first.learning_rate * training.lr_factor(2, first),
                1e-3 * training.lr_factor(4, then), 1e-3 * training.lr_factor(6, then)]  # poly over 8 steps from 1e-3
    assert rates == pytest.approx(expected, rel=1e-5) and rates[2] > rates[3] > 0  # metrics.csv keeps 6 digits
    assert f"the learning rate continues at {expected[2]:.3g}: poly over 4 epochs from learning_rate 0.001" in \
        capsys.readouterr().out
    # more epochs alone: the rates a 4-epoch run has in its epochs 3 and 4
    train.train(hyperparameters.load(overrides={**settings, "run_dir": tmp_path / "two"}))
    train.train(hyperparameters.load(overrides={**settings, "run_dir": tmp_path / "two", "resume": True, "epochs": 4}))
    train.train(hyperparameters.load(overrides={**settings, "run_dir": tmp_path / "four", "epochs": 4}))
    resumed, fresh = ([float(row["lr"]) for row in read_csv(tmp_path / run / "metrics.csv")] for run in ("two", "four"))
    assert resumed[2:] == fresh[2:] and resumed[2] > 0


# ---------------------------------------------------------------- checkpoints: names, pickles, prepared arrays, folds

def test_checkpoint_paths_with_brackets_or_a_comma_are_taken_as_named(tiny_raw, tmp_path, monkeypatch):
    bracket = save_tiny_checkpoint(tmp_path / "runs" / "exp[1]" / "checkpoint_best.pt")
    comma = save_tiny_checkpoint(tmp_path / "runs" / "lr1e-3,bs2" / "checkpoint_best.pt")
    folds = [save_tiny_checkpoint(tmp_path / "runs" / "cv[2]" / f"fold_{k}" / "checkpoint_best.pt") for k in range(2)]
    (tmp_path / "hp.txt").write_text("checkpoint: runs/lr1e-3,bs2/checkpoint_best.pt\n")
    monkeypatch.chdir(tmp_path)
    for typed, expected in ((f"checkpoint={bracket}", [bracket]),
                            ("checkpoint=runs/lr1e-3,bs2/checkpoint_best.pt", [comma]),
                            (f"checkpoint={tmp_path}/runs/cv[2]/fold_*/checkpoint_best.pt", folds),
                            (f"checkpoint={bracket},{tmp_path}/runs/lr1e-3?bs2/*.pt", [bracket, comma])):
        assert inference.checkpoint_paths(hyperparameters.load(overrides=[typed])) == expected, typed
    assert inference.checkpoint_paths(hyperparameters.load(tmp_path / "hp.txt")) == [comma]
    hp = hyperparameters.load(overrides=[f"checkpoint={comma}", f"predict_input_dir={tiny_raw}",
                                         f"prediction_dir={tmp_path / 'p'}", "precision=fp32"])
    assert len(predict.predict(hp)) == len([p for p in tiny_raw.iterdir() if p.is_dir()])


@pytest.mark.parametrize("script", ["train", "predict"])
def test_an_old_style_pickle_is_refused_as_unsafe_without_advice_to_load_it_anyway(tiny_prepared, tiny_raw, tmp_path,
                                                                                   monkeypatch, capsys, script):
    path = tmp_path / "run" / "checkpoint_last.pt"
    path.parent.mkdir()
    with open(path, "wb") as file:  # a model saved with pickle, as older projects did
        pickle.dump({"model": {"weight": [0.5, 0.25]}, "epoch": 3}, file, protocol=4)
    if script == "train":
        message = main_message(train, monkeypatch, **train_settings(tiny_prepared, path.parent, resume=True))
    else:
        message = main_message(predict, monkeypatch, checkpoint=path, predict_input_dir=tiny_raw,
                               prediction_dir=tmp_path / "p")
    assert message.startswith(f"error: {path}: refused as unsafe: a pickle that the safe loader (weights_only) "
                              "cannot read as tensors and plain values (")
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message
    assert "will likely succeed" not in message + capsys.readouterr().err


def test_a_prepared_array_holding_python_objects_is_named_before_training(tiny_prepared, tmp_path, monkeypatch):
    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, prepared)
    name = next(name for name, case in read_manifest(prepared)["cases"].items() if case["split"] == "train")
    np.save(prepared / f"{name}.npy", np.array([{"not": "an image"}], dtype=object), allow_pickle=True)
    message = main_message(train, monkeypatch, **train_settings(prepared, tmp_path / "run"))
    assert message.startswith(f"error: {prepared / name}.npy: not a prepared array (")
    assert message.endswith("); delete it and run prepare_dataset.py again")
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()


@pytest.mark.parametrize("num_folds, expected", [
    (2, "holds the runs of folds 0, 1, 2, but num_folds is 2: set num_folds: 3, or name the checkpoints"),
    (1, "holds the runs of folds 0, 1, 2, but num_folds is 1: set num_folds: 3, or name the checkpoints"),
    (4, "holds the runs of folds 0, 1, 2, but num_folds is 4: train fold 3 first, or name the checkpoints"),
])
def test_predict_refuses_an_ensemble_of_other_folds_than_the_run_has(tiny_raw, tmp_path, monkeypatch, num_folds,
                                                                    expected):
    for fold in range(3):
        save_tiny_checkpoint(tmp_path / "run" / f"fold_{fold}" / "checkpoint_final.pt")
    message = main_message(predict, monkeypatch, run_dir=tmp_path / "run", num_folds=num_folds,
                           predict_input_dir=tiny_raw, prediction_dir=tmp_path / "p")
    assert message == f"error: {tmp_path / 'run'}: {expected} (checkpoint: ...)"
    assert not (tmp_path / "p").exists() or not list((tmp_path / "p").iterdir())
    hp = hyperparameters.load(overrides={"run_dir": tmp_path / "run", "num_folds": 3})
    assert inference.checkpoint_paths(hp) == [tmp_path / "run" / f"fold_{k}" / "checkpoint_final.pt" for k in range(3)]


# ---------------------------------------------------------------- lesion-wise statistics, devices, archives

def test_infinite_lesion_wise_distances_give_infinite_statistics_without_warnings(tmp_path, capsys):
    pytest.importorskip("brats_evaluation", reason="brats-evaluation is not installed")
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for index in range(3):  # edema in truth and prediction; a false one-voxel ET lesion in two of them
        truth, prediction = np.zeros((30, 30, 30), np.uint8), np.zeros((30, 30, 30), np.uint8)
        truth[5:9, 5:9, 5:9] = prediction[5:9, 5:9, 5:9] = 2
        prediction[20, 20, 20] = 4 if index < 2 else 0  # BraTS 2020's enhancing tumor
        for folder, labels in (("truth", truth), ("pred", prediction)):
            (tmp_path / folder).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(labels, affine), tmp_path / folder / f"Case-{index}.nii.gz")
    hp = hyperparameters.load(overrides={"prediction_dir": tmp_path / "pred", "raw_data_dir": tmp_path / "truth",
                                         "run_dir": tmp_path / "run", "prepared_dir": tmp_path / "none",
                                         "lesion_wise": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = evaluate.evaluate(hp)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    assert [row["lesionwise_hd95_mean_et"] for row in rows][:2] == [math.inf, math.inf]
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("lesionwise_hd95_mean   et"))
    assert line.split()[2:] == ["inf"] * 5  # mean, std, median and quartiles: two of three cases infinite
    assert statistics_of([1.0, math.inf, math.inf])["median"] == math.inf
    assert statistics_of([1.0, 2.0, math.inf, math.inf]) == pytest.approx(
        {"mean": math.inf, "std": math.inf, "median": math.inf, "25%": 1.75, "75%": math.inf})
    assert statistics_of([1.0, 2.0, 4.0, 8.0]) == pytest.approx(dict(zip(
        ("mean", "std", "median", "25%", "75%"), (3.75, np.std([1, 2, 4, 8], ddof=1), *np.percentile([1, 2, 4, 8],
                                                                                                    [50, 25, 75])))))


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps"])
@pytest.mark.parametrize("script", [train, predict, crossval])
def test_a_device_this_pytorch_lacks_is_one_line_naming_the_setting_and_the_devices(
        tiny_prepared, tiny_raw, tmp_path, monkeypatch, script, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    settings = {"device": device, "prepared_dir": tiny_prepared, "raw_data_dir": tiny_raw, "run_dir": tmp_path / "run",
                "features": "2, 4", "patch_size": "16, 16, 16", "num_workers": 0,
                "checkpoint": save_tiny_checkpoint(tmp_path / "tiny.pt"), "prediction_dir": tmp_path / "p"}
    message = main_message(script, monkeypatch, **settings)
    kind = "Apple GPU" if device == "mps" else "CUDA GPU"
    assert message == f"error: device: {device}, but this PyTorch sees no {kind} (it sees: cpu" + (
        "; a CPU-only build of PyTorch, or no driver): use device: auto or cpu" if kind == "CUDA GPU" else
        "): use device: auto or cpu")
    assert not (tmp_path / "run").exists()


def test_a_device_index_beyond_the_gpus_names_the_gpus_it_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"^device: cuda:2 needs GPU 2, but this machine shows 2 GPU\(s\) "
                                         r"\(CUDA_VISIBLE_DEVICES, --nproc_per_node; it sees: cpu, cuda:0, cuda:1\)$"):
        devices.resolve_device("cuda:2", cuda_available=True, mps_available=False)


@pytest.mark.parametrize("script", ["prepare", "predict", "evaluate"])
def test_a_folder_holding_only_an_archive_says_to_unpack_it(tmp_path, monkeypatch, script):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "MICCAI_BraTS2020_TrainingData.zip").write_bytes(b"PK\x03\x04")
    (raw / "._MICCAI_BraTS2020_TrainingData.zip").write_bytes(b"macOS metadata")  # no archive: a leftover
    if script == "prepare":
        message = main_message(prepare_dataset, monkeypatch, raw_data_dir=raw, prepared_dir=tmp_path / "prepared")
    elif script == "predict":
        message = main_message(predict, monkeypatch, predict_input_dir=raw, prediction_dir=tmp_path / "p",
                               checkpoint=save_tiny_checkpoint(tmp_path / "tiny.pt"))
    else:
        (tmp_path / "pred").mkdir()
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "pred" / "Case.nii.gz")
        message = main_message(evaluate, monkeypatch, raw_data_dir=raw, prediction_dir=tmp_path / "pred",
                               run_dir=tmp_path / "run", prepared_dir=tmp_path / "none")
    assert str(raw) in message
    assert "it holds MICCAI_BraTS2020_TrainingData.zip: unpack it first" in message
