"""The protocol of crossval.py on tiny generated data: the split written once, folds that never see the test
split, resume and parallel folds, fold ensembles in predict.py, the ET threshold search, missing predictions."""
import csv
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import crossval
import evaluate
import predict
import prepare_dataset
import train
from bratsunet import cases, checkpoints, evaluation, hyperparameters, inference, loader, losses, network, preprocessing
from bratsunet import manifest as manifest_module
from bratsunet.manifest import assign_splits, fold_cases, holdout_cases, read_manifest, split_cases
from bratsunet.conventions import REGION_NAMES, brats_to_internal, internal_to_brats, labels_to_regions
from bratsunet.metrics import HD95_EMPTY
from conftest import REPO
from test_train import without_seconds

# 2 folds of 4 cases, 2 test cases; tiny network and training, whole volumes in few windows
SETTINGS = {"num_workers": 0, "features": "4, 8, 16", "patch_size": "16, 16, 16", "batch_size": 2, "epochs": 2,
            "steps_per_epoch": 2, "val_every": 2, "sw_batch_size": 6, "sw_overlap": 0, "learning_rate": 3e-3,
            "seed": 5, "num_folds": 2, "test_fraction": 0.2, "et_search_max": 300}


def case_of(path):
    """Case name of a file that a step reads: {case}.npy, {case}.nii.gz or {case folder}/..._seg.nii."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    return os.path.basename(folder) if "_seg." in name else name.split(".")[0]


@pytest.fixture(scope="module")
def cv_raw(tmp_path_factory, tiny_raw):
    """12 case folders (each tiny case twice, under other names; 2 of them healthy): 10 labelled cases."""
    raw = tmp_path_factory.mktemp("cv_raw")
    for source in sorted(tiny_raw.iterdir()):
        for copy in "ab":  # a folder of its own, its files links to the case's
            (raw / f"Case-{source.name[-2:]}{copy}").mkdir()
            for path in source.iterdir():
                (raw / f"Case-{source.name[-2:]}{copy}" / path.name).symlink_to(path)
    return raw


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, cv_raw):
    """prepare, then crossval.py with every case a step reads recorded -> (hp, manifest, cases read, record)."""
    folder = tmp_path_factory.mktemp("cv")
    hp = hyperparameters.load(overrides={**SETTINGS, "raw_data_dir": cv_raw, "prepared_dir": folder / "prepared",
                                         "run_dir": folder / "run", "prediction_dir": folder / "predictions"})
    manifest = prepare_dataset.prepare_dataset(hp)
    read = set()

    def recording(original, name_of):
        def record(*args):
            read.add(name_of(*args))
            return original(*args)
        return record

    with pytest.MonkeyPatch.context() as monkeypatch:  # training patches and validation volumes, raw cases, label maps
        monkeypatch.setattr(loader, "open_case", recording(loader.open_case, lambda _, entry: case_of(entry["image"])))
        monkeypatch.setattr(inference, "load_case", recording(cases.load_case, lambda case, *_: case.name))
        for module in (cases, evaluation):
            monkeypatch.setattr(module, "load_labels", recording(cases.load_labels, lambda path, *_: case_of(path)))
        record = crossval.crossval(hp)
    return hp, manifest, read, record


def test_splits_are_seeded_disjoint_and_cover_the_labelled_cases():
    names = [f"case{i:02d}" for i in range(23)]
    hp = hyperparameters.load(overrides={"seed": 1, "test_fraction": 0.2, "num_folds": 5})
    splits = assign_splits(names, hp)[0]
    test = sorted(n for n, (split, _) in splits.items() if split == "test")
    folds = [sorted(n for n, (split, fold) in splits.items() if split == "val" and fold == k) for k in range(5)]
    assert len(test) == 5 and sorted(len(f) for f in folds) == [3, 3, 4, 4, 4]  # 18 cases in 5 folds
    assert sorted(test + sum(folds, [])) == names  # every case once
    manifest = {"cases": {n: {"seg": f"{n}_seg.npy", "split": s, "fold": f} for n, (s, f) in splits.items()}}
    manifest["cases"]["unlabelled"] = {"seg": None, "split": "unlabeled", "fold": None}
    for k, fold in enumerate(folds):
        train_names, val_names = split_cases(manifest, k)
        assert val_names == fold and not set(train_names) & set(val_names)
        assert sorted(train_names + val_names) == sorted(set(names) - set(test))  # never a test case
    assert holdout_cases(manifest) == test
    assert assign_splits(list(reversed(names)), hp)[0] == splits  # seeded, by case
    other = assign_splits(names, hp.replace(seed=2))[0]
    assert sorted(n for n, (s, _) in other.items() if s == "test") != test
    # the test split does not depend on the folds; one fold keeps the single split of val_fraction
    single = assign_splits(names, hp.replace(num_folds=1, val_fraction=0.3))[0]
    assert sorted(n for n, (s, _) in single.items() if s == "test") == test
    val = sorted(n for n, (s, f) in single.items() if s == "val" and f == 0)
    assert len(val) == 5 and [s for s, _ in single.values()].count("train") == 13
    single_manifest = {"cases": {n: {"seg": 1, "split": s, "fold": f} for n, (s, f) in single.items()}}
    assert split_cases(single_manifest, 0) == (sorted(set(names) - set(test) - set(val)), val)
    with pytest.raises(cases.CaseError, match="num_folds 5: only 3 labelled case"):
        assign_splits(names[:4], hp)


def test_a_case_that_comes_or_goes_moves_no_other_case():
    """Each case's place comes from a hash of its name and the seed; the cuts between the places are kept in
    dataset.json, so a case added or filtered out later changes the split of no other case."""
    names = [f"BraTS20_Training_{i:03d}" for i in range(1, 41)]
    hp = hyperparameters.load(overrides={"seed": 3, "test_fraction": 0.2, "num_folds": 5})
    splits, cuts = assign_splits(names, hp)
    grown, _ = assign_splits(names + ["BraTS20_Training_041", "BraTS20_Training_042"], hp, cuts=cuts)
    shrunk, _ = assign_splits(names[1:], hp, cuts=cuts)
    assert {name: grown[name] for name in names} == splits
    assert shrunk == {name: splits[name] for name in names[1:]}
    assert assign_splits(names[::-1], hp, cuts=cuts)[0] == splits  # the order the cases come in plays no part
    assert [split for split, _ in splits.values()].count("test") == 8
    assert sorted(len([n for n, (s, f) in splits.items() if s == "val" and f == k]) for k in range(5)) == [6, 6, 6, 7, 7]
    # 32 cases outside the test split, dealt evenly


def test_the_split_is_stratified_by_the_grades_of_name_mapping_csv(tmp_path):
    """BraTS 2020's name_mapping.csv gives each case's grade (HGG, LGG): the test split and every fold take their
    share of each grade, counted, and dataset.json keeps the grade."""
    grades = {f"BraTS20_Training_{i:03d}": "HGG" if i <= 30 else "LGG" for i in range(1, 41)}  # 30 HGG, 10 LGG
    folder = tmp_path / "MICCAI_BraTS2020_TrainingData"
    folder.mkdir()
    (folder / "name_mapping.csv").write_text(
        "Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,BraTS_2019_subject_ID,"
        "BraTS_2020_subject_ID\n" + "".join(f"{grade},,,,,{name}\n" for name, grade in grades.items()))
    assert manifest_module.case_grades(tmp_path) == grades
    hp = hyperparameters.load(overrides={"seed": 3, "test_fraction": 0.2, "num_folds": 5})
    splits, cuts = assign_splits(list(grades), hp, grades)
    assert sorted(cuts) == ["HGG", "LGG"]
    count = lambda grade, split, fold=None: sum(s == split and (fold is None or f == fold)
                                                for name, (s, f) in splits.items() if grades[name] == grade)
    assert (count("HGG", "test"), count("LGG", "test")) == (6, 2)  # 20% of each grade
    assert sorted(count("HGG", "val", k) for k in range(5)) == [4, 5, 5, 5, 5]  # 24 HGG dealt into 5 folds
    assert sorted(count("LGG", "val", k) for k in range(5)) == [1, 1, 2, 2, 2]  # 8 LGG
    # a case without a grade is in a stratum of its own; a bad name_mapping.csv is said and not used
    assert assign_splits(list(grades) + ["Other_001"], hp, grades, cuts)[1].keys() == {"HGG", "LGG", "any"}
    (folder / "name_mapping.csv").write_bytes(b"\xff\xfe\x00garbage")
    assert manifest_module.case_grades(tmp_path) == {}


def test_prepare_refuses_to_split_again_under_a_trained_run_and_says_how_to_start_over(cv_raw, tmp_path, capsys):
    prepared = tmp_path / "prepared"
    hp = hyperparameters.load(overrides={"raw_data_dir": cv_raw, "prepared_dir": prepared, "num_workers": 0,
                                         "num_folds": 2, "run_dir": tmp_path / "run"})
    first = prepare_dataset.prepare_dataset(hp)
    assert prepare_dataset.prepare_dataset(hp.replace(val_fraction=0.5)) == {  # the split does not use it
        **first, "settings": {**first["settings"], "val_fraction": 0.5}}
    prepare_dataset.prepare_dataset(hp.replace(seed=1))  # nothing trained on it yet: split again, and said
    out = capsys.readouterr().out
    assert "split again (seed 42 -> 1): no run in" in out, out
    prepare_dataset.prepare_dataset(hp)
    (tmp_path / "run" / "fold_1").mkdir(parents=True)
    (tmp_path / "run" / "fold_1" / "checkpoint_last.pt").write_bytes(b"")  # a run has started on this split
    before = (prepared / "dataset.json").read_bytes()
    for changes, said in (({"seed": 1}, "seed 42 -> 1"), ({"num_folds": 3}, "num_folds 2 -> 3"),
                          ({"test_fraction": 0.5}, "test_fraction 0.2 -> 0.5")):
        with pytest.raises(cases.CaseError, match="would change") as error:
            prepare_dataset.prepare_dataset(hp.replace(**changes))
        message = str(error.value)
        assert said in message and "fold_1/checkpoint_last.pt" in message and "\n" not in message
        assert "new prepared_dir" in message and "delete this dataset.json" in message
        assert (prepared / "dataset.json").read_bytes() == before  # untouched
    (prepared / "dataset.json").unlink()  # the explicit way to split anew
    assert prepare_dataset.prepare_dataset(hp.replace(seed=1))["settings"]["seed"] == 1
    manifest = read_manifest(prepared)
    with pytest.raises(ValueError, match="split into 2 fold.*num_folds is 3"):
        fold_cases(manifest, hp.replace(num_folds=3))
    with pytest.raises(ValueError, match="fold 2: the folds of .* are 0 .. 1"):
        fold_cases(manifest, hp.replace(fold=2))


def test_prepare_keeps_every_case_in_its_split_when_a_case_comes_and_reads_old_manifests(cv_raw, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for folder in sorted(cv_raw.iterdir()):
        (raw / folder.name).symlink_to(folder)
    hp = hyperparameters.load(overrides={"raw_data_dir": raw, "prepared_dir": tmp_path / "prepared", "num_workers": 0,
                                         "num_folds": 2, "run_dir": tmp_path / "run"})
    first = prepare_dataset.prepare_dataset(hp)
    assert first["settings"]["split_rule"] == "case hash" and list(first["settings"]["split_cuts"]) == ["any"]
    (raw / "Case-new").mkdir()  # one more case (a copy of another), prepared into the same folder
    for path in (cv_raw / "Case-01a").iterdir():
        (raw / "Case-new" / path.name).symlink_to(path)
    second = prepare_dataset.prepare_dataset(hp)
    assert "split again (1 new case(s))" in capsys.readouterr().out
    assert {name: case["split"] for name, case in first["cases"].items()} == {
        name: case["split"] for name, case in second["cases"].items() if name != "Case-new"}
    assert [case["fold"] for case in first["cases"].values()] == [
        case["fold"] for name, case in second["cases"].items() if name != "Case-new"]
    # a dataset.json split by the rule before (one permutation of all cases) stays readable; splitting it again
    # by the hash is refused under a run trained on it, and said without one
    old = json.loads((hp.prepared_dir / "dataset.json").read_text())
    del old["settings"]["split_rule"], old["settings"]["split_cuts"]
    names = sorted(name for name, case in old["cases"].items() if case["split"] == "val")
    old["cases"][names[0]]["fold"] = 1 - old["cases"][names[0]]["fold"]
    (hp.prepared_dir / "dataset.json").write_text(json.dumps(old))
    assert split_cases(read_manifest(hp.prepared_dir), 0)[1] != split_cases(second, 0)[1]
    (tmp_path / "run" / "fold_0").mkdir(parents=True)
    (tmp_path / "run" / "fold_0" / "checkpoint_last.pt").write_bytes(b"")
    with pytest.raises(cases.CaseError, match=r"its split would change \(the split rule: case hash\) under the runs"):
        prepare_dataset.prepare_dataset(hp)
    (tmp_path / "run" / "fold_0" / "checkpoint_last.pt").unlink()
    assert prepare_dataset.prepare_dataset(hp)["settings"]["split_rule"] == "case hash"
    assert "split again (the split rule: case hash)" in capsys.readouterr().out


def test_the_test_split_never_reaches_training_selection_or_tuning(cv_run):
    hp, manifest, read, record = cv_run
    test = holdout_cases(manifest)
    folds = [split_cases(manifest, k)[1] for k in range(2)]
    assert len(test) == 2 and [len(f) for f in folds] == [4, 4] and not set(folds[0]) & set(folds[1])
    assert read and not read & set(test)  # no step of training, selection, prediction or tuning read them
    assert read == set(folds[0] + folds[1])
    for k, fold in enumerate(folds):
        run = hp.run_dir / f"fold_{k}"
        for name in ("checkpoint_last.pt", "checkpoint_best.pt", "checkpoint_final.pt"):
            split = torch.load(run / name, weights_only=True)["split"]
            assert split == {"fold": k, "train": folds[1 - k], "val": fold}
        # the out-of-fold predictions: this fold's validation cases, with their probabilities, by the final weights
        assert sorted(p.name for p in (run / "validation").iterdir()) == sorted(
            [f"{n}{suffix}" for n in fold for suffix in (".nii.gz", "_probabilities.npz")] + ["predicted_with.json"])
        assert json.loads((run / "validation" / "predicted_with.json").read_text()) == {
            "checkpoint": "checkpoint_final.pt", "epoch": 2}
    with open(hp.run_dir / "crossval.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert tuple(rows[0]) == ("case", "fold") + evaluation.COLUMNS[1:]
    assert sorted((row["case"], int(row["fold"])) for row in rows) == sorted(
        (n, k) for k, fold in enumerate(folds) for n in fold)
    assert json.loads((hp.run_dir / "postprocessing.json").read_text()) == record
    assert record["out_of_fold_predictions_of"] == {f"fold_{k}": "checkpoint_final.pt, epoch 2" for k in range(2)}
    for picture in ("crossval_boxplot.png", "postprocessing.png"):
        assert (hp.run_dir / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert record["cases"] == 8 and 0 <= record["et_min_voxels"] <= 300
    assert record["mean_dice_ET"]["with"] >= record["mean_dice_ET"]["without"]


def test_predict_takes_the_test_split_with_the_fold_ensemble_and_evaluate_expects_it(cv_run, capsys):
    hp, manifest, _, record = cv_run
    test = holdout_cases(manifest)
    written = predict.predict(hp)
    assert written == [hp.prediction_dir / f"{name}.nii.gz" for name in test]
    out = capsys.readouterr().out
    assert "ensemble of 2 checkpoints" in out and "fold_0/checkpoint_final.pt" in out and "fold_1" in out
    assert f"et_min_voxels {record['et_min_voxels']} from {hp.run_dir / 'postprocessing.json'}" in out
    assert "predicting 2 case(s): the test split" in out
    written[0].unlink()  # a case whose prediction is missing is scored as a failure
    rows = evaluate.evaluate(hp)
    assert [row["case"] for row in rows] == test
    assert [rows[0][f"dice_{r}"] for r in REGION_NAMES] == [0, 0, 0]
    assert f"1 case(s) without a prediction, scored as failures (Dice 0, HD95 373.13 mm): {test[0]}" in \
        capsys.readouterr().out


def test_predict_refuses_a_test_case_that_a_checkpoint_trained_or_validated_on(cv_run, tmp_path, monkeypatch):
    hp, manifest, _, _ = cv_run
    test = holdout_cases(manifest)
    checkpoint = torch.load(hp.run_dir / "fold_0" / "checkpoint_final.pt", weights_only=True)
    checkpoint["split"]["val"] = checkpoint["split"]["val"] + [test[1]]  # a model that validated on a test case
    checkpoints.save_checkpoint(checkpoint, tmp_path / "fold_0" / "checkpoint_final.pt")
    shutil.copy(hp.run_dir / "fold_1" / "checkpoint_final.pt", tmp_path / "fold_1.pt")
    ensemble = hp.replace(checkpoint=f"{tmp_path / 'fold_1.pt'}, {tmp_path / 'fold_0' / 'checkpoint_final.pt'}",
                          prediction_dir=tmp_path / "predictions")
    with pytest.raises(ValueError, match=rf"fold_0/checkpoint_final.pt trained or validated on 1 case\(s\) of the "
                                         rf"test split of dataset.json \({test[1]}\)"):
        predict.predict(ensemble)
    assert not (tmp_path / "predictions").exists()
    monkeypatch.setattr(sys, "argv", ["predict.py", *(f"{key}={getattr(hp, key)}" for key in (
        "raw_data_dir", "prepared_dir", "num_folds", "seed")), f"checkpoint={tmp_path / 'fold_0' / 'checkpoint_final.pt'}",
        f"prediction_dir={tmp_path / 'predictions'}"])
    with pytest.raises(SystemExit, match="^error: .*checkpoint_final.pt trained or validated on 1 case") as stop:
        predict.main()
    assert "\n" not in str(stop.value) and not (tmp_path / "predictions").exists()


def test_a_fold_trained_before_final_checkpoints_gets_one_and_its_predictions_made_again(cv_run, tmp_path):
    """A fold from before checkpoint_final.pt existed: its out-of-fold predictions came from checkpoint_best.pt.
    crossval.py writes its final checkpoint (the last epoch's, as checkpoint_last.pt holds it) and predicts again."""
    hp, _, _, record = cv_run
    run = shutil.copytree(hp.run_dir, tmp_path / "run", symlinks=True)
    (run / "fold_0" / "checkpoint_final.pt").unlink()
    (run / "fold_0" / "validation" / "predicted_with.json").unlink()
    before, other = ({path.name: path.stat().st_mtime_ns for path in (run / f"fold_{k}" / "validation").iterdir()}
                     for k in range(2))
    assert crossval.crossval(hp.replace(run_dir=run)) == record
    final = torch.load(run / "fold_0" / "checkpoint_final.pt", weights_only=True)
    last = torch.load(run / "fold_0" / "checkpoint_last.pt", weights_only=True)
    assert final["epoch"] == 2 and all(torch.equal(final["model"][k], v) for k, v in last["model"].items())
    after = {path.name: path.stat().st_mtime_ns for path in (run / "fold_0" / "validation").iterdir()}
    assert all(after[name] != mtime for name, mtime in before.items())  # every prediction made again
    assert other == {path.name: path.stat().st_mtime_ns for path in (run / "fold_1" / "validation").iterdir()}


def test_crossval_again_trains_nothing(cv_run, capsys):
    hp, _, _, record = cv_run
    before = {k: (hp.run_dir / f"fold_{k}" / "checkpoint_last.pt").stat().st_mtime_ns for k in range(2)}
    assert crossval.crossval(hp) == record
    assert before == {k: (hp.run_dir / f"fold_{k}" / "checkpoint_last.pt").stat().st_mtime_ns for k in range(2)}
    assert "trained 2 epochs already" in capsys.readouterr().out


def test_a_resumed_fold_continues_where_it_stopped(cv_run, tmp_path, monkeypatch, capsys):
    hp, _, _, _ = cv_run
    prepared = tmp_path / "prepared"
    shutil.copytree(hp.prepared_dir, prepared)
    fold = hp.replace(prepared_dir=prepared, run_dir=tmp_path / "run", fold=1)
    save = checkpoints.save_checkpoint

    def stop_once_epoch_1_is_saved(state, path):
        save(state, path)
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "save_checkpoint", stop_once_epoch_1_is_saved)
    with pytest.raises(KeyboardInterrupt):
        train.train(fold)
    monkeypatch.setattr(checkpoints, "save_checkpoint", save)
    assert not (tmp_path / "run" / "fold_0").exists()
    train.train(fold.replace(resume=True))
    assert f"resuming {tmp_path / 'run' / 'fold_1' / 'checkpoint_last.pt'} after epoch 1" in capsys.readouterr().out
    resumed = torch.load(tmp_path / "run" / "fold_1" / "checkpoint_last.pt", weights_only=True)
    uninterrupted = torch.load(hp.run_dir / "fold_1" / "checkpoint_last.pt", weights_only=True)
    assert without_seconds(resumed["metrics"]) == without_seconds(uninterrupted["metrics"])
    assert all(torch.equal(resumed["model"][k], v) for k, v in uninterrupted["model"].items())
    # dataset.json split again under the run: the fold refuses to go on
    manifest = json.loads((prepared / "dataset.json").read_text())
    one, other = resumed["split"]["val"][0], resumed["split"]["train"][0]
    manifest["cases"][one]["fold"], manifest["cases"][other]["fold"] = 0, 1
    (prepared / "dataset.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="trained on other cases than fold 1 of dataset.json"):
        train.train(fold.replace(resume=True, epochs=3))


def test_two_folds_trained_in_parallel_processes_do_not_disturb_each_other(cv_run, tmp_path):
    hp, _, _, _ = cv_run
    run = tmp_path / "run"
    arguments = [f"{key}={value}" for key, value in SETTINGS.items()] + [
        f"{key}={getattr(hp, key)}" for key in ("raw_data_dir", "prepared_dir")] + [f"run_dir={run}", "fold=0"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the threads of the runs they match
    other = subprocess.Popen([sys.executable, str(REPO / "train.py"), *arguments], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    train.train(hp.replace(run_dir=run, fold=1))  # while fold 0 trains in the other process
    output = other.communicate(timeout=300)[0]
    assert other.returncode == 0, output
    assert sorted(p.name for p in run.iterdir()) == ["fold_0", "fold_1"]
    for k in range(2):
        alone = torch.load(hp.run_dir / f"fold_{k}" / "checkpoint_last.pt", weights_only=True)
        parallel = torch.load(run / f"fold_{k}" / "checkpoint_last.pt", weights_only=True)
        assert parallel["split"] == alone["split"]
        assert all(torch.equal(parallel["model"][key], value) for key, value in alone["model"].items())
        assert sorted(p.name for p in (run / f"fold_{k}" / "validation").iterdir()) == sorted(
            p.name for p in (hp.run_dir / f"fold_{k}" / "validation").iterdir())


# ---------------------------------------------------------------- ensembles

def save_random_checkpoint(path, seed, target="regions", hp=None):
    hp = hp or hyperparameters.load(overrides={"features": "4, 8, 16", "patch_size": "16, 16, 16", "target": target})
    torch.manual_seed(seed)
    checkpoints.save_checkpoint({"model_args": network.model_args(hp), "model": network.build_model(hp).state_dict(),
                           "hyperparameters": hp.to_dict()}, path)
    return path


def test_ensembles_average_the_probabilities_of_their_checkpoints(tiny_raw, tmp_path, capsys):
    case = "BraTS20_Training_001"
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / case).symlink_to(tiny_raw / case)
    paths = [save_random_checkpoint(tmp_path / f"fold_{k}" / "checkpoint_best.pt", seed=k) for k in range(2)]
    hp = hyperparameters.load(overrides={"predict_input_dir": tmp_path / "input", "save_probabilities": True,
                                         "sw_batch_size": 6, "sw_overlap": 0, "precision": "fp32",
                                         "et_min_voxels": 0})

    runs = iter(range(100))

    def run(checkpoint, **changes):
        out = hp.replace(checkpoint=checkpoint, prediction_dir=tmp_path / f"out{next(runs)}", **changes)
        written = predict.predict(out)[0]
        with np.load(out.prediction_dir / f"{case}_probabilities.npz") as saved:
            return np.asanyarray(nib.load(written).dataobj), saved["probabilities"], saved["crop_box"]

    image, _, _ = cases.load_case(predict.cases_to_predict(hp)[0])
    normalized, box = preprocessing.preprocess(image, hp.crop_margin)
    members = [inference.load_for_inference(hp, torch.device("cpu"), path) for path in paths]
    probabilities = [inference.predict_case(net, normalized, member, member.target) for net, member in members]

    def expected_labels(probs):  # probabilities over the crop box -> disk labels in the input grid
        labels = losses.probabilities_to_labels(probs, "regions").numpy()
        return internal_to_brats(inference.labels_in_input_grid(labels, box, image.shape[1:]))

    # an ensemble of one checkpoint is that checkpoint
    labels, probs, crop = run(paths[0])
    assert np.array_equal(labels, expected_labels(probabilities[0]))
    assert np.array_equal(probs, probabilities[0].numpy().astype(np.float16)) and crop.tolist() == list(map(list, box))
    # an ensemble of two: the labels of their mean probabilities, from a glob or a comma list alike
    mean = (probabilities[0] + probabilities[1]) / 2
    for checkpoint in (str(tmp_path / "fold_*" / "checkpoint_best.pt"), f"{paths[1]}, {paths[0]}"):
        labels, probs, _ = run(checkpoint)
        assert np.array_equal(labels, expected_labels(mean))
        assert np.abs(probs.astype(np.float32) - mean.numpy()).max() < 1e-3
    assert not np.array_equal(labels, expected_labels(probabilities[0]))  # the mean is not either member
    assert not np.array_equal(labels, expected_labels(probabilities[1]))
    assert "ensemble of 2 checkpoints" in capsys.readouterr().out
    # postprocessing.json in the folder above fold_K folders applies unless et_min_voxels is set
    assert (labels == 4).any()
    (tmp_path / "postprocessing.json").write_text(json.dumps({"et_min_voxels": 10 ** 9}))
    assert not (run(str(tmp_path / "fold_*" / "checkpoint_best.pt"), et_min_voxels=None)[0] == 4).any()
    assert np.array_equal(run(str(tmp_path / "fold_*" / "checkpoint_best.pt"))[0], labels)  # et_min_voxels: 0
    # checkpoints that predict different things do not mix
    other = save_random_checkpoint(tmp_path / "labels.pt", seed=2, target="labels")
    with pytest.raises(ValueError, match=r"labels.pt: its network differs from that of .*fold_0.*target labels vs "
                                         r"regions"):
        predict.predict(hp.replace(checkpoint=f"{paths[0]}, {other}"))
    with pytest.raises(FileNotFoundError, match="no file matches"):
        predict.predict(hp.replace(checkpoint=str(tmp_path / "nothing_*.pt")))


# ---------------------------------------------------------------- ET threshold and missing predictions

def write_labels(path, disk_labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(disk_labels, np.uint8), np.eye(4)), path)


def test_the_threshold_search_picks_the_best_et_min_voxels(tmp_path):
    # (predicted ET voxels, true ET?) per case: removing the false 30 and 80 voxel ETs helps, removing the true
    # 50 and 200 voxel ones hurts: the mean ET Dice is 0.5 below 31, 0.75 from 31 to 50, 0.5 to 80, 0.75 to 200
    cases = {"a": (30, False), "b": (50, True), "c": (80, False), "d": (200, True)}
    shape = (12, 12, 12)
    core = np.zeros(shape, bool)
    core[2:10, 2:10, 2:10] = True
    for name, (voxels, true_et) in cases.items():
        probabilities = torch.zeros((3, *shape))  # WT, TC, ET
        probabilities[0, 1:11, 1:11, 1:11] = 0.9
        probabilities[1][torch.from_numpy(core)] = 0.8
        probabilities[2].view(-1)[np.flatnonzero(core)[:voxels]] = 0.7  # the first voxels of the core
        labels = losses.probabilities_to_labels(probabilities, "regions").numpy()
        assert np.count_nonzero(labels == 3) == voxels
        write_labels(tmp_path / "run" / "validation" / f"{name}.nii.gz", internal_to_brats(labels))
        truth = labels if true_et else np.where(labels == 3, 1, labels)  # a false ET: the truth has necrosis there
        write_labels(tmp_path / "truth" / f"{name}.nii.gz", internal_to_brats(truth))
    hp = hyperparameters.load(overrides={"run_dir": tmp_path / "run", "raw_data_dir": tmp_path / "truth",
                                         "et_search_max": 300})
    rows, _ = evaluation.evaluate_folders(hp.run_dir / "validation", hp.raw_data_dir, (), "seg")
    rows = [{"fold": 0, **row} for row in rows]
    best, means, rows_with = crossval.tune_et_threshold(hp, rows, hp.data_format)
    assert best == 31 and len(means) == 301
    assert means[[0, 30, 31, 50, 51, 80, 81, 200, 201, 300]] == pytest.approx([.5, .5, .75, .75, .5, .5, .75, .75,
                                                                                .5, .5])
    assert [row["dice_ET"] for row in rows_with] == [1, 1, 0, 1]  # only a's ET removed
    assert rows_with[0]["hd95_ET"] == 0 and rows_with[0]["dice_WT"] == rows[0]["dice_WT"] == 1
    assert crossval.search_et_threshold(np.array([5, 0]), np.array([0.2, 1.0]), np.array([0.2, 1.0]), 9)[0] == 0


def test_a_missing_prediction_is_scored_as_a_failure(tiny_raw, tmp_path, capsys):
    names = sorted(p.name for p in tiny_raw.iterdir())[:3]  # 001, 002 and the healthy 003
    for name in names:
        (tmp_path / "input").mkdir(exist_ok=True)
        (tmp_path / "input" / name).symlink_to(tiny_raw / name)
    for name in names + ["BraTS20_Training_004"]:  # ground truth without modalities; 004 was not asked for
        (tmp_path / "truth" / name).mkdir(parents=True)
        shutil.copy(tiny_raw / name / f"{name}_seg.nii", tmp_path / "truth" / name)
    (tmp_path / "pred").mkdir()
    shutil.copy(tiny_raw / names[0] / f"{names[0]}_seg.nii", tmp_path / "pred" / f"{names[0]}.nii")  # perfect
    hp = hyperparameters.load(overrides={"prediction_dir": tmp_path / "pred", "raw_data_dir": tmp_path / "truth",
                                         "predict_input_dir": tmp_path / "input", "run_dir": tmp_path / "run"})
    rows = {row["case"]: row for row in evaluate.evaluate(hp)}
    assert sorted(rows) == names
    assert all(rows[names[0]][f"dice_{r}"] == 1 for r in REGION_NAMES)
    for name in names[1:]:
        seg = nib.load(tiny_raw / name / f"{name}_seg.nii")
        voxel = float(np.prod(seg.header.get_zooms()))
        for region, mask in zip(REGION_NAMES, labels_to_regions(brats_to_internal(np.asanyarray(seg.dataobj)))):
            assert [rows[name][f"{m}_{region}"] for m in evaluation.METRICS] == pytest.approx(
                [0, HD95_EMPTY, 0, 0, 0, mask.sum() * voxel])
    out = capsys.readouterr().out
    assert "3 case(s) evaluated" in out and f"the cases expected: the cases of {tmp_path / 'input'}" in out
    assert f"2 case(s) without a prediction, scored as failures (Dice 0, HD95 373.13 mm): {names[1]}, {names[2]}" \
        in out
    with open(hp.prediction_dir / "evaluation.csv", newline="") as file:
        assert [row["case"] for row in csv.DictReader(file)] == names


def test_out_of_fold_predictions_land_in_the_raw_grid_of_the_real_sample(sample_case, tmp_path, monkeypatch):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / sample_case.name).symlink_to(sample_case)
    hp = hyperparameters.load(overrides={"raw_data_dir": tmp_path / "raw", "prepared_dir": tmp_path / "prepared",
                                         "run_dir": tmp_path / "run", "num_workers": 0, "test_fraction": 0})
    case = prepare_dataset.prepare_dataset(hp)["cases"][sample_case.name]
    net = network.build_model(hp)
    seg = np.load(hp.prepared_dir / case["seg"])  # (x, y, z) cropped internal labels

    def truth_as_probabilities(members, image):  # a perfect network, on the prepared image it is given
        assert image.shape == (4, *seg.shape) and image.dtype == np.float32
        return torch.from_numpy(labels_to_regions(seg).astype(np.float32))  # (3, x, y, z) WT, TC, ET

    monkeypatch.setattr(inference, "ensemble_probabilities", truth_as_probabilities)
    assert inference.predict_validation(hp, [sample_case.name], net, 1) == [sample_case.name]
    out_of_fold = nib.load(hp.run_dir / "validation" / f"{sample_case.name}.nii.gz")
    truth = nib.load(sample_case / f"{sample_case.name}_seg.nii.gz")
    assert np.array_equal(np.asanyarray(out_of_fold.dataobj), np.asanyarray(truth.dataobj))  # every voxel in place
    assert np.allclose(out_of_fold.affine, truth.affine) and out_of_fold.header.get_zooms() == truth.header.get_zooms()
    metrics = evaluation.evaluate_pair(hp.run_dir / "validation" / f"{sample_case.name}.nii.gz", sample_case /
                                     f"{sample_case.name}_seg.nii.gz")
    assert all(metrics[region]["dice"] == 1 for region in REGION_NAMES)


def test_a_case_with_a_small_tumor_is_kept_and_filtered_cases_are_listed_with_their_tumor_share(tiny_raw, tmp_path,
                                                                                               capsys):
    source, healthy = tiny_raw / "BraTS20_Training_001", "BraTS20_Training_003"
    small = tmp_path / "raw" / "Case-small"
    small.mkdir(parents=True)
    for path in source.iterdir():
        if "_seg" not in path.name:
            (small / path.name).symlink_to(path)
    seg = nib.load(source / f"{source.name}_seg.nii")
    labels = np.asanyarray(seg.dataobj).copy()
    labels.reshape(-1)[np.flatnonzero(labels)[5:]] = 0  # 5 tumor voxels left
    nib.save(nib.Nifti1Image(labels, seg.affine), small / "Case-small_seg.nii")
    (tmp_path / "raw" / healthy).symlink_to(tiny_raw / healthy)
    brain = np.any([np.asanyarray(nib.load(p).dataobj) != 0 for p in small.iterdir() if "_seg" not in p.name], axis=0)
    share = 100 * 5 / brain.sum()
    assert share < 0.1  # the seed's bg_threshold 0.999 took such a case for a healthy one
    hp = hyperparameters.load(overrides={"raw_data_dir": tmp_path / "raw", "prepared_dir": tmp_path / "prepared",
                                         "run_dir": tmp_path / "run", "num_workers": 0})
    manifest = prepare_dataset.prepare_dataset(hp)  # bg_threshold 1.0: only cases without tumor are filtered
    assert list(manifest["cases"]) == ["Case-small"] and list(manifest["filtered"]) == [healthy]
    assert "tumor share 0.0000% (0 voxels)" in manifest["filtered"][healthy]
    old = prepare_dataset.prepare_dataset(hp.replace(prepared_dir=tmp_path / "old", bg_threshold=0.999))
    assert sorted(old["filtered"]) == sorted(["Case-small", healthy]) and not old["cases"]
    assert f"tumor share {share:.4f}% (5 voxels)" in old["filtered"]["Case-small"]
    assert f"filtered Case-small: healthy: tumor share {share:.4f}% (5 voxels)" in capsys.readouterr().out
