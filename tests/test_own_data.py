"""One's own data: the README's settings file runs every step in its own folders, folders left at the demo's follow
another raw_data_dir, and a step pointed at another dataset's folder refuses before any work, naming both."""
import shutil
import sys

import pytest

import evaluate
import predict
import prepare_dataset
import train
from bratsunet import checkpoints, hyperparameters, training
from bratsunet.cases import CaseError
from bratsunet.manifest import read_manifest

from conftest import REPO

TINY = {"features": "4, 8, 16", "patch_size": "16, 16, 16", "batch_size": 2, "epochs": 1, "steps_per_epoch": 2,
        "num_workers": 0}


def snapshot(folder):
    """{path: modification time} of everything under folder (nothing when it does not exist)."""
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*")} if folder.exists() else {}


def run_script(script, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *argv])
    script.main()


def test_the_readmes_settings_file_runs_every_step_in_its_own_folders(tiny_raw, tmp_path, monkeypatch, capsys):
    settings = tmp_path / "my_brats.txt"  # as the README's "Your own data in five commands" writes it
    settings.write_text(f"raw_data_dir: {tiny_raw}\nprepared_dir: data/my_brats_prepared\nrun_dir: runs/my_brats\n"
                        "prediction_dir: runs/my_brats/predictions\ndata_format: brats2020\n"
                        + "".join(f"{key}: {value}\n" for key, value in TINY.items()))
    demo = {folder: snapshot(REPO / folder) for folder in ("data", "runs")}
    for script in (prepare_dataset, train, predict, evaluate):
        run_script(script, ["--hp", str(settings)], monkeypatch)
    prepared, run = tmp_path / "data" / "my_brats_prepared", tmp_path / "runs" / "my_brats"
    test_cases = sorted(name for name, case in read_manifest(prepared)["cases"].items() if case["split"] == "test")
    assert test_cases and (run / "checkpoint_best.pt").is_file()
    assert sorted(path.name for path in (run / "predictions").iterdir()) == sorted(
        [f"{name}.nii.gz" for name in test_cases] + ["evaluation.csv", "evaluation_boxplot.png"])
    assert f"wrote {run / 'predictions' / 'evaluation.csv'}" in capsys.readouterr().out
    assert demo == {folder: snapshot(REPO / folder) for folder in ("data", "runs")}  # the demo's folders untouched


def test_folders_left_at_the_demos_follow_another_raw_data_dir(tmp_path):
    shipped = hyperparameters.read_file(hyperparameters.DEFAULT_FILE)
    assert {key: shipped[key] for key in hyperparameters.DEMO_FOLDERS} == {
        key: (REPO / folder).resolve() for key, folder in hyperparameters.DEMO_FOLDERS.items()}
    demo = hyperparameters.load()  # the demo keeps its folders
    assert (demo.prepared_dir, demo.run_dir, demo.prediction_dir) == (shipped["prepared_dir"], shipped["run_dir"],
                                                                       shipped["prediction_dir"])
    settings = tmp_path / "mine.txt"
    settings.write_text("raw_data_dir: downloads/BraTS2020_TrainingData\n")
    hp = hyperparameters.load(settings)
    assert hp.raw_data_dir == tmp_path / "downloads" / "BraTS2020_TrainingData"
    assert hp.prepared_dir == REPO / "data" / "BraTS2020_TrainingData_prepared"
    assert hp.run_dir == REPO / "runs" / "BraTS2020_TrainingData"
    assert hp.prediction_dir == REPO / "runs" / "BraTS2020_TrainingData" / "predictions"
    hp = hyperparameters.load(settings, [f"run_dir={tmp_path / 'run'}"])  # set ones are kept; predictions follow
    assert (hp.run_dir, hp.prediction_dir) == (tmp_path / "run", tmp_path / "run" / "predictions")
    assert hp.prepared_dir == REPO / "data" / "BraTS2020_TrainingData_prepared"
    hp = hyperparameters.load(overrides={"raw_data_dir": tmp_path / "x", "prepared_dir": tmp_path / "p",
                                         "prediction_dir": tmp_path / "pred"})
    assert (hp.prepared_dir, hp.run_dir, hp.prediction_dir) == (tmp_path / "p", REPO / "runs" / "x", tmp_path / "pred")


def never(*args, **kwargs):
    raise AssertionError("work started before the refusal")


def test_preparing_another_datasets_folder_is_refused_before_any_work(tiny_prepared, tiny_raw, tmp_path,
                                                                      monkeypatch):
    other = tmp_path / "other_raw"
    shutil.copytree(tiny_raw / "BraTS20_Training_001", other / "BraTS20_Training_001")
    before = snapshot(tiny_prepared)
    monkeypatch.setattr(prepare_dataset, "find_cases", never)
    monkeypatch.setattr(prepare_dataset, "prepare_case", never)
    hp = hyperparameters.load(overrides={"raw_data_dir": other, "prepared_dir": tiny_prepared, "num_workers": 0})
    with pytest.raises(CaseError) as error:
        prepare_dataset.prepare_dataset(hp)
    message = str(error.value)
    assert f"prepared from raw_data_dir {tiny_raw}, not from {other}" in message
    assert "set prepared_dir to a folder of its own" in message and "\n" not in message
    assert snapshot(tiny_prepared) == before


def save_run(path, prepared_dir):
    checkpoints.save_checkpoint({"epoch": 1, "hyperparameters": {"prepared_dir": str(prepared_dir)}}, path)


def test_training_into_another_datasets_run_is_refused_before_any_work_even_to_overwrite(tiny_prepared, tmp_path,
                                                                                         monkeypatch):
    run = tmp_path / "run"
    save_run(run / "checkpoint_last.pt", tmp_path / "another_prepared")
    before = snapshot(run)
    monkeypatch.setattr(train, "PatchDataset", never)
    monkeypatch.setattr(training, "build_for_training", never)
    hp = hyperparameters.load(overrides={**TINY, "prepared_dir": tiny_prepared, "run_dir": run, "overwrite": True,
                                         "val_fraction": 0.34, "test_fraction": 0})
    with pytest.raises(ValueError) as error:
        train.train(hp)
    message = str(error.value)
    assert f"{run} holds a run trained on prepared_dir {tmp_path / 'another_prepared'}, not on {tiny_prepared}" \
        in message and "set run_dir to a folder of its own" in message
    assert snapshot(run) == before  # overwrite=True removed nothing
    save_run(run / "checkpoint_last.pt", tiny_prepared)  # its own run: no refusal here
    training.check_run_source(run, tiny_prepared)


@pytest.fixture
def prepared_under_a_run(tiny_raw, tmp_path):
    """tiny_raw's cases (links) prepared into tmp_path/prepared, a run started on the split in tmp_path/run."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for case in tiny_raw.iterdir():
        (raw / case.name).symlink_to(case)
    hp = hyperparameters.load(overrides={"raw_data_dir": raw, "prepared_dir": tmp_path / "prepared",
                                         "run_dir": tmp_path / "run", "num_workers": 0})
    prepare_dataset.prepare_dataset(hp)
    save_run(hp.run_dir / "checkpoint_last.pt", hp.prepared_dir)
    return hp


def test_a_split_that_would_change_under_a_run_is_refused_before_any_case_is_prepared(prepared_under_a_run,
                                                                                      tiny_raw, monkeypatch):
    hp = prepared_under_a_run
    manifest = (hp.prepared_dir / "dataset.json").read_bytes()
    (hp.prepared_dir / "BraTS20_Training_002.npy").unlink()  # work to do: this case must be prepared again
    source = tiny_raw / "BraTS20_Training_003"
    new = hp.raw_data_dir / "BraTS20_Training_100"
    new.mkdir()
    for path in source.iterdir():  # a case that comes
        shutil.copy(path, new / path.name.replace(source.name, new.name))
    monkeypatch.setattr(prepare_dataset, "prepare_case", never)
    for changes, said in (({}, "1 new case(s)"), ({"seed": 1}, "seed 42 -> 1")):
        with pytest.raises(CaseError, match="its split would change") as error:
            prepare_dataset.prepare_dataset(hp.replace(**changes))
        assert said in str(error.value) and str(hp.run_dir / "checkpoint_last.pt") in str(error.value)
    with pytest.raises(CaseError, match="num_folds 9: only"):  # too few for the folds
        prepare_dataset.prepare_dataset(hp.replace(num_folds=9))
    assert (hp.prepared_dir / "dataset.json").read_bytes() == manifest
