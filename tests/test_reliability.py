"""Bad inputs: the broken files a user can realistically feed prepare, predict and evaluate, and the bad
checkpoints, folders and settings train and predict meet. Each gives one line naming the file and the
problem, the other cases go on, and nothing half-done is left that a re-run would take as complete.

BREAKS is the list behind the table of docs/bad-inputs.md: one broken copy of a good case per row,
all of them in one raw folder next to one untouched case, run once through each script."""
import ast
import contextlib
import csv
import gzip
import io
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import evaluate
import predict
import prepare_dataset
import train
from bratsunet import checkpoints, evaluation, hyperparameters, inference, network
from bratsunet.manifest import read_manifest
from bratsunet.files import LOCK

from conftest import REPO

SOURCE = "BraTS20_Training_001"  # a generated case with every tumor label
GOOD = "Case-good"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors run faster on one thread, and a busy machine cannot stall OpenMP's waiting threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- ways to break a file

def read_nifti(path):
    image = nib.load(str(path), mmap=False)  # not memory-mapped: the file is rewritten below
    return np.asanyarray(image.dataobj), image.affine


def rewrite(path, array, affine=None):
    """Save array in place of path's NIfTI (same affine unless given, same name and compression, and the
    phantom mark of the header kept: generated cases smaller than the BraTS grid stay readable)."""
    old = nib.load(str(path), mmap=False)
    image = nib.Nifti1Image(array, old.affine if affine is None else affine)
    image.header["descrip"] = old.header["descrip"]
    nib.save(image, str(path))
    return path


def with_compression(path, compressed):
    """path as .nii.gz (compressed) or .nii, converting the file when needed -> the new path."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    target = path.with_name(name + ".gz" if compressed else name)
    if target != path:
        data = path.read_bytes()
        target.write_bytes(gzip.compress(data) if compressed else gzip.decompress(data))
        path.unlink()
    return target


def delete(path):
    path.unlink()
    return path.parent  # messages name the case folder


def misname(path):  # {case}_seg.nii -> {case}_labels.nii
    target = path.with_name(path.name.replace("_seg.", "_labels."))
    path.rename(target)
    return target


def zero_bytes(path):
    path.write_bytes(b"")
    return path


def truncated(compressed):
    def cut(path):  # a download cut short: the first half of the file
        path = with_compression(path, compressed)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path
    return cut


def flipped_byte(path):  # one bit flipped mid-file, as a bad disk or a copy gone wrong leaves it
    path = with_compression(path, False)
    target = path.with_name(path.name + ".gz")
    data = bytearray(gzip.compress(path.read_bytes(), compresslevel=0))  # stored: the stream itself stays valid
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    path.unlink()
    return target


def not_nifti(path):  # a web server's error page saved under the file's name
    path.write_bytes(b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n" * 20)
    return path


def cropped(path):
    return rewrite(path, read_nifti(path)[0][:, :, :-2].copy())


def shifted(path):
    array, affine = read_nifti(path)
    affine = affine.copy()
    affine[:3, 3] += 5.0  # 5 mm off
    return rewrite(path, array, affine)


def one_voxel(value, dtype):
    def put(path):  # value on one voxel inside the brain (or the tumor, for a label map)
        array = read_nifti(path)[0].astype(dtype)
        array[tuple(np.argwhere(array != 0)[0])] = value
        return rewrite(path, array)
    return put


def all_zero(path):
    return rewrite(path, np.zeros_like(read_nifti(path)[0]))


def offset_intensities(offset):
    def shift(path):  # every voxel moved, background included: no voxel is 0
        return rewrite(path, read_nifti(path)[0].astype(np.int16) + np.int16(offset))
    return shift


def with_intercept(intercept):
    def save(path):  # the stored int16 values, read back shifted by the header's scl_inter
        array, affine = read_nifti(path)
        image = nib.Nifti1Image(array.astype(np.int16), affine)
        image.header.set_slope_inter(1.0, intercept)
        nib.save(image, str(path))
        return path
    return save


def scaled(factor):
    def scale(path):  # float64 intensities far beyond float32's 3.4e38, yet finite
        return rewrite(path, read_nifti(path)[0].astype(np.float64) * factor)
    return scale


class Break:
    """A way to break one file of a case and what each script says (None: the case goes through)."""

    def __init__(self, key, what, channel, damage, prepare, predict, evaluate, prediction_too=False):
        self.key, self.what, self.channel, self.damage = key, what, channel, damage
        self.expected = {"prepare": prepare, "predict": predict, "evaluate": evaluate}
        self.prediction_too = prediction_too  # also tried on a predicted label map against good ground truth

    @property
    def case(self):
        return f"Case-{self.key}"


UNREADABLE = "not a readable NIfTI file"
BREAKS = [
    Break("no_t2", "missing modality (t2 deleted)", "t2", delete, "missing modality t2", "missing modality t2",
          None),  # the ground truth is the segmentation alone
    Break("no_truth", "missing segmentation", "seg", delete, "no segmentation", None, "no segmentation"),
    Break("misnamed_truth", "misnamed segmentation (_labels.nii)", "seg", misname, "no segmentation", None,
          "no segmentation"),
    Break("empty_flair", "zero-byte image", "flair", zero_bytes, "empty file (0 bytes)", "empty file (0 bytes)", None),
    Break("empty_truth", "zero-byte segmentation", "seg", zero_bytes, "empty file (0 bytes)", None,
          "empty file (0 bytes)", prediction_too=True),
    Break("cut_gz_t1ce", "truncated .nii.gz image", "t1ce", truncated(True), UNREADABLE, UNREADABLE, None),
    Break("cut_gz_truth", "truncated .nii.gz segmentation", "seg", truncated(True), UNREADABLE, None, UNREADABLE,
          prediction_too=True),
    Break("cut_nii_t1", "truncated .nii image", "t1", truncated(False), UNREADABLE, UNREADABLE, None),
    Break("crc_t1ce", "one byte flipped in a .nii.gz image", "t1ce", flipped_byte, "CRC check failed",
          "CRC check failed", None),
    Break("crc_truth", "one byte flipped in a .nii.gz segmentation", "seg", flipped_byte, "CRC check failed", None,
          "CRC check failed", prediction_too=True),
    Break("html_flair", "not NIfTI, named .nii (an HTML error page)", "flair", not_nifti, UNREADABLE, UNREADABLE,
          None),
    Break("html_truth", "not NIfTI, named .nii (segmentation)", "seg", not_nifti, UNREADABLE, None, UNREADABLE,
          prediction_too=True),
    Break("shape_t1", "modalities of different shapes", "t1", cropped, "differs from", "differs from", None),
    Break("shape_truth", "segmentation of another shape", "seg", cropped, "differs from", None, "differs from",
          prediction_too=True),
    Break("affine_t2", "modalities with different affines", "t2", shifted, "affine differs", "affine differs", None),
    Break("affine_truth", "segmentation with another affine", "seg", shifted, "affine differs", None,
          "affine differs", prediction_too=True),
    Break("nan_t1ce", "NaN intensity", "t1ce", one_voxel(np.nan, np.float32), "NaN or Inf intensities",
          "NaN or Inf intensities", None),
    Break("inf_flair", "Inf intensity", "flair", one_voxel(np.inf, np.float32), "NaN or Inf intensities",
          "NaN or Inf intensities", None),
    Break("zero_t2", "all-zero image", "t2", all_zero, "image is all zero", "image is all zero", None),
    Break("label3", "label 3", "seg", one_voxel(3, np.uint8), "unexpected label values [3]", None,
          "unexpected label values [3]", prediction_too=True),
    Break("label255", "label 255", "seg", one_voxel(255, np.uint8), "unexpected label values [255]", None,
          "unexpected label values [255]", prediction_too=True),
    Break("label_minus1", "label -1", "seg", one_voxel(-1, np.int16), "unexpected label values [-1]", None,
          "unexpected label values [-1]", prediction_too=True),
    Break("float_label", "float label 3.9999", "seg", one_voxel(3.9999, np.float32), "non-integer label values",
          None, "non-integer label values", prediction_too=True),
    Break("negative_t1", "non-zero background: every intensity - 1000", "t1", offset_intensities(-1000),
          "t1.nii (the volume's border is mostly -1000)", "background is not 0", None),
    Break("intercept_t2", "non-zero background: int16 with intercept 100", "t2", with_intercept(100.0),
          "the header's intercept scl_inter is 100", "background is not 0", None),
    Break("huge_flair", "float64 intensities near 1e200", "flair", scaled(1e200), None, None, None),
]
SCRIPTS = ("prepare", "predict", "evaluate", "evaluate_prediction")


def copy_case(source, folder, name):
    """A copy of a raw case folder under another case name."""
    folder.mkdir(parents=True)
    for path in source.iterdir():
        shutil.copy(path, folder / path.name.replace(source.name, name))
    return folder


def copy_label_map(seg_path, path):
    """The segmentation saved as a label map {case}.nii.gz: a perfect prediction."""
    array, affine = read_nifti(seg_path)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def run_captured(function, *args):
    """function(*args) -> everything it printed (and the error it raised, if any)."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            function(*args)
        except Exception as error:  # noqa: BLE001 - the test reads what the user would see
            print(f"error: {error}")
    return output.getvalue()


def recording_reasons(monkeypatch, reasons):
    """Record every reason predict gives for a case it cannot use: the exact text, to check it is one line."""
    find_cases, predict_file = predict.find_cases, inference.predict_file

    def find_and_record(*args):
        cases, problems = find_cases(*args)
        reasons.update({Path(folder).name: reason for folder, reason in problems})
        return cases, problems

    def predict_and_record(net, case, hp):
        try:
            return predict_file(net, case, hp)
        except Exception as error:
            reasons[case.name] = str(error)
            raise

    monkeypatch.setattr(predict, "find_cases", find_and_record)
    monkeypatch.setattr(inference, "predict_file", predict_and_record)


def evaluate_recording(hp, reasons):
    """evaluate(hp), recording the reasons of the cases it could not evaluate."""
    evaluate_folders = evaluation.evaluate_folders

    def evaluate_and_record(*args, **kwargs):
        rows, not_evaluated = evaluate_folders(*args, **kwargs)
        reasons.update(not_evaluated)
        return rows, not_evaluated

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(evaluate, "evaluate_folders", evaluate_and_record)
        return run_captured(evaluate.evaluate, hp)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_raw):
    """Every break in one raw folder beside a good case, run once through prepare, predict and evaluate
    -> {script: (output folder, printed text, {case: reason}, {case: broken path})}."""
    root = tmp_path_factory.mktemp("breaks")
    raw, named = root / "raw", {}
    copy_case(tiny_raw / SOURCE, raw / GOOD, GOOD)
    for row in BREAKS:
        folder = copy_case(tiny_raw / SOURCE, raw / row.case, row.case)
        named[row.case] = row.damage(folder / f"{row.case}_{row.channel}.nii")
    hp = hyperparameters.load(overrides={
        "raw_data_dir": raw, "prepared_dir": root / "prepared", "run_dir": root / "run", "num_workers": 0,
        "prediction_dir": root / "predictions", "predict_input_dir": raw, "checkpoint": root / "tiny.pt",
        "features": "2, 4", "patch_size": "32, 32, 32", "precision": "fp32", "sw_batch_size": 4,
        "val_fraction": 0.34})
    results = {}
    text = run_captured(prepare_dataset.prepare_dataset, hp)
    manifest = read_manifest(hp.prepared_dir)
    reasons = {**manifest["skipped"], **manifest.get("unlabeled", {})}
    results["prepare"] = (hp.prepared_dir, text, reasons, named)

    torch.manual_seed(0)
    checkpoints.save_checkpoint({"model_args": network.model_args(hp), "model": network.build_model(hp).state_dict(),
                           "hyperparameters": hp.to_dict()}, hp.checkpoint)
    reasons = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        recording_reasons(monkeypatch, reasons)
        results["predict"] = (hp.prediction_dir, run_captured(predict.predict, hp), reasons, named)

    # ground truth broken, prediction perfect
    (root / "perfect").mkdir()
    for case in [GOOD] + [row.case for row in BREAKS]:
        copy_label_map(tiny_raw / SOURCE / f"{SOURCE}_seg.nii", root / "perfect" / f"{case}.nii.gz")
    hp_truth = hp.replace(prediction_dir=root / "perfect", run_dir=root / "evaluate")  # every case expected
    reasons = {}
    results["evaluate"] = (hp_truth.run_dir, evaluate_recording(hp_truth, reasons), reasons, named)

    # prediction broken, ground truth good (a folder of label maps)
    (root / "truth").mkdir()
    (root / "broken_predictions").mkdir()
    named_predictions = {}
    for case in [GOOD] + [row.case for row in BREAKS if row.prediction_too]:
        copy_label_map(tiny_raw / SOURCE / f"{SOURCE}_seg.nii", root / "truth" / f"{case}.nii.gz")
        prediction = copy_label_map(tiny_raw / SOURCE / f"{SOURCE}_seg.nii",
                                    root / "broken_predictions" / f"{case}.nii.gz")
        row = next((row for row in BREAKS if row.case == case), None)
        if row:
            named_predictions[case] = row.damage(prediction)
    hp_pred = hp.replace(prediction_dir=root / "broken_predictions", raw_data_dir=root / "truth",
                         run_dir=root / "evaluate_prediction", predict_input_dir=None)
    reasons = {}
    results["evaluate_prediction"] = (hp_pred.run_dir, evaluate_recording(hp_pred, reasons), reasons,
                                      named_predictions)
    return results


def outputs_of(script, folder, case):
    """The files a script leaves for a case, that a re-run would take as done."""
    if script == "prepare":
        return sorted(p.name for p in folder.glob(f"{case}*") if p.name in
                      (f"{case}.npy", f"{case}_seg.npy", f"{case}.json"))
    if script == "predict":
        return sorted(p.name for p in folder.glob(f"{case}.nii*"))
    with open(folder / "evaluation.csv", newline="") as file:
        return [row["case"] for row in csv.DictReader(file) if row["case"] == case]


def test_break_names_are_distinct():
    keys = [row.key for row in BREAKS]
    assert len(set(keys)) == len(keys)
    assert not [a for a in keys for b in keys if a != b and b.startswith(a)]  # no name inside another


TRIES = [(row, script) for row in BREAKS for script in SCRIPTS if script != "evaluate_prediction" or row.prediction_too]


@pytest.mark.parametrize("row, script", TRIES, ids=[f"{row.key}-{script}" for row, script in TRIES])
def test_bad_input_gives_one_line_naming_the_file_and_leaves_nothing_half_done(runs, row, script):
    folder, text, reasons, named = runs[script]
    expected = row.expected["evaluate" if script == "evaluate_prediction" else script]
    assert "Traceback" not in text
    if expected is None:  # the broken file plays no part in this step: the case goes through
        assert row.case not in reasons and outputs_of(script, folder, row.case)
        return
    reason = reasons.get(row.case)
    assert reason is not None, f"no reason given for {row.case}:\n{text}"
    assert "\n" not in reason and expected in reason
    assert named[row.case].name in reason, f"the message does not name {named[row.case].name}: {reason}"
    assert reason in text  # printed, where the user sees it
    if expected == "no segmentation" and script == "prepare":  # prepared as an unlabeled case, and said so
        assert outputs_of(script, folder, row.case) == [f"{row.case}.json", f"{row.case}.npy"]
        assert read_manifest(folder)["cases"][row.case]["split"] == "unlabeled"
    else:
        assert outputs_of(script, folder, row.case) == []
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != LOCK]  # no temporary files


def test_intensities_beyond_float32_are_prepared_as_their_unscaled_copy(runs):
    folder = runs["prepare"][0]  # the z-score does not change with the scale: the same arrays as the good case
    huge, good = np.load(folder / "Case-huge_flair.npy"), np.load(folder / f"{GOOD}.npy")
    assert np.isfinite(huge).all()
    np.testing.assert_allclose(huge.astype(np.float32), good.astype(np.float32), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_good_case_goes_through_every_script(runs, script):
    folder, _, reasons, _ = runs[script]
    assert GOOD not in reasons and outputs_of(script, folder, GOOD)


def test_a_case_fixed_after_a_run_is_prepared_by_the_rerun_and_nothing_else_is_redone(tiny_raw, tiny_hp, tmp_path,
                                                                                     monkeypatch):
    raw = tmp_path / "raw"
    copy_case(tiny_raw / SOURCE, raw / GOOD, GOOD)
    folder = copy_case(tiny_raw / SOURCE, raw / "Case-later", "Case-later")
    zero_bytes(folder / "Case-later_t1.nii")
    hp = tiny_hp.replace(raw_data_dir=raw)
    assert "Case-later" in prepare_dataset.prepare_dataset(hp)["skipped"]
    shutil.copy(tiny_raw / SOURCE / f"{SOURCE}_t1.nii", folder / "Case-later_t1.nii")  # the download, redone
    loaded, load_case = [], prepare_dataset.load_case
    monkeypatch.setattr(prepare_dataset, "load_case", lambda case, *grid: loaded.append(case.name) or load_case(case, *grid))
    manifest = prepare_dataset.prepare_dataset(hp)
    assert loaded == ["Case-later"] and not manifest["skipped"]
    assert sorted(manifest["cases"]) == ["Case-good", "Case-later"]


# ---------------------------------------------------------------- folders, settings and checkpoints

def run_main(script, monkeypatch, *overrides):
    """script.main() with key=value arguments -> the one-line message it exits with."""
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *(f"{k}={v}" for k, v in overrides)])
    with pytest.raises(SystemExit) as stop:
        script.main()
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def save_tiny_checkpoint(path, features="2, 4"):
    """An untrained network with every entry of a checkpoint of train.py."""
    hp = hyperparameters.load(overrides={"features": features, "patch_size": "32, 32, 32"})
    torch.manual_seed(0)
    net = network.build_model(hp)
    checkpoints.save_checkpoint({"model_args": network.model_args(hp), "model": net.state_dict(),
                           "optimizer": torch.optim.AdamW(net.parameters()).state_dict(), "scheduler": {},
                           "scaler": {}, "epoch": 1, "best_score": None, "metrics": [], "rng": checkpoints.rng_state(),
                           "hyperparameters": hp.to_dict()}, path)
    return path


@pytest.mark.parametrize("arguments, expected", [  # test_hyperparameters.py tests each error of load()
    (["seed: 1", "val_fraction: 1.5"], "hp.txt line 2: 'val_fraction' must be >= 0 and < 1, got '1.5'"),
    (["seed: 1", "seed: 2"], "hp.txt line 2: duplicate key 'seed' (first set on line 1)"),
    (None, "hp.txt: hyperparameter file not found"),
    ("--hp", "command line: --hp needs a file"),
], ids=["out of range", "duplicate key", "missing file", "no file after --hp"])
def test_bad_settings_file_stops_every_script_with_one_line(tmp_path, arguments, expected):
    path = tmp_path / "hp.txt"
    if isinstance(arguments, list):
        path.write_text("\n".join(arguments) + "\n")
    argv = ["--hp"] if arguments == "--hp" else ["--hp", str(path)]
    with pytest.raises(SystemExit) as stop:  # every script's main() starts with this call
        hyperparameters.from_command_line(argv)
    message = str(stop.value.code)
    assert message.startswith("error: ") and message.endswith(expected) and "\n" not in message


@pytest.mark.parametrize("script, state, expected", [
    ("prepare", "missing", "raw_data_dir does not exist"),
    ("prepare", "empty", "no case folders with NIfTI files"),
    ("predict", "missing", "predict_input_dir does not exist"),
    ("predict", "empty", "no case folders with NIfTI files"),
    ("evaluate", "missing", "does not exist"),
    ("evaluate", "empty", "no ground truth"),
])
def test_missing_or_empty_input_folder_stops_with_one_line(tmp_path, monkeypatch, script, state, expected):
    folder = tmp_path / "input"
    if state == "empty":
        folder.mkdir()
    if script == "prepare":
        message = run_main(prepare_dataset, monkeypatch, ("raw_data_dir", folder), ("prepared_dir", tmp_path / "p"))
        assert not (tmp_path / "p" / "dataset.json").exists()
    elif script == "predict":
        message = run_main(predict, monkeypatch, ("predict_input_dir", folder), ("prediction_dir", tmp_path / "p"),
                           ("checkpoint", save_tiny_checkpoint(tmp_path / "tiny.pt")))
    else:
        (tmp_path / "pred").mkdir()
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(tmp_path / "pred" / "Case.nii.gz"))
        message = run_main(evaluate, monkeypatch, ("raw_data_dir", folder), ("prediction_dir", tmp_path / "pred"),
                           ("run_dir", tmp_path / "run"))
        assert not (tmp_path / "run" / "evaluation.csv").exists()
    assert str(folder) in message and expected in message


@pytest.mark.parametrize("script", ["prepare", "train", "predict", "evaluate"])
def test_output_folder_that_cannot_be_made_stops_with_one_line(tmp_path, tiny_raw, tiny_prepared, monkeypatch,
                                                               script):
    blocker = tmp_path / "a_file"  # running as root, permissions block nothing: a file where a folder must go
    blocker.write_text("not a folder")
    out = blocker / "out"
    if script == "prepare":
        message = run_main(prepare_dataset, monkeypatch, ("raw_data_dir", tiny_raw), ("prepared_dir", out))
    elif script == "train":
        message = run_main(train, monkeypatch, ("prepared_dir", tiny_prepared), ("run_dir", out),
                           ("features", "2, 4"), ("num_workers", 0))
    elif script == "predict":
        message = run_main(predict, monkeypatch, ("predict_input_dir", tiny_raw), ("prediction_dir", out),
                           ("checkpoint", save_tiny_checkpoint(tmp_path / "tiny.pt")))
    else:
        (tmp_path / "pred").mkdir()
        copy_label_map(tiny_raw / SOURCE / f"{SOURCE}_seg.nii", tmp_path / "pred" / f"{SOURCE}.nii.gz")
        message = run_main(evaluate, monkeypatch, ("raw_data_dir", tiny_raw), ("prediction_dir", tmp_path / "pred"),
                           ("run_dir", out))
    assert str(out) in message
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("script, state, expected", [
    ("train", "missing", "run prepare_dataset.py first"),
    ("train", "empty", "run prepare_dataset.py first"),
    ("train", "no cases", "no cases"),
    ("train", "deleted array", "run prepare_dataset.py"),
    ("predict", "empty", "run prepare_dataset.py first"),
])
def test_missing_or_empty_prepared_dir_stops_with_one_line(tmp_path, tiny_prepared, tiny_raw, monkeypatch, script,
                                                           state, expected):
    prepared = tmp_path / "prepared"
    if state != "missing":
        prepared.mkdir()
    if state == "no cases":  # every case was skipped or filtered
        manifest = read_manifest(tiny_prepared)
        manifest["cases"] = {}
        (prepared / "dataset.json").write_text(json.dumps(manifest))
    if state == "deleted array":  # a prepared array removed by hand
        shutil.copytree(tiny_prepared, prepared, dirs_exist_ok=True)
        name = next(iter(read_manifest(prepared)["cases"]))
        (prepared / f"{name}.npy").unlink()
        expected = f"{name}.npy"
    if script == "train":
        message = run_main(train, monkeypatch, ("prepared_dir", prepared), ("run_dir", tmp_path / "run"),
                           ("features", "2, 4"), ("patch_size", "16, 16, 16"), ("num_workers", 0), ("epochs", 1),
                           ("steps_per_epoch", 1))
        assert not (tmp_path / "run" / "checkpoint_last.pt").exists()
    else:
        message = run_main(predict, monkeypatch, ("prepared_dir", prepared), ("raw_data_dir", tiny_raw),
                           ("prediction_dir", tmp_path / "p"), ("checkpoint", save_tiny_checkpoint(tmp_path / "t.pt")))
    assert expected in message and str(prepared) in message


class CreatesFile:
    """Unpickling this would call open(target, "w"): a stand-in for any code a checkpoint could carry."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


def write_bad_checkpoint(path, kind, tmp_path):
    """A checkpoint of another architecture, another project's bare weights, a pickle that would run code, or
    a real checkpoint cut short."""
    if kind == "architecture":  # a network of features 2, 4 in a checkpoint saying 4, 8, 16 (or resumed as such)
        save_tiny_checkpoint(path, "2, 4")
    elif kind == "bare weights":  # torch.save(net.state_dict()) from another project
        torch.save(network.UNet3D(4, 3, [2, 4]).state_dict(), path)
    elif kind == "malicious":
        torch.save({"model": CreatesFile(tmp_path / "pwned.txt")}, path)
    else:
        save_tiny_checkpoint(path)
        path.write_bytes(path.read_bytes()[:3000])


@pytest.mark.parametrize("script", ["train", "predict"])
@pytest.mark.parametrize("kind, expected", [
    ("architecture", "features"),
    ("bare weights", "no model_args"),
    ("malicious", "contains code objects"),
    ("corrupt", "corrupt or truncated checkpoint"),
])
def test_bad_checkpoint_stops_with_one_line_and_runs_no_code(tmp_path, tiny_prepared, tiny_raw, monkeypatch, script,
                                                              kind, expected):
    if script == "train":  # resume: True reads run_dir/checkpoint_last.pt
        path = tmp_path / "run" / "checkpoint_last.pt"
        path.parent.mkdir()
        write_bad_checkpoint(path, kind, tmp_path)
        message = run_main(train, monkeypatch, ("prepared_dir", tiny_prepared), ("run_dir", path.parent),
                           ("resume", True), ("features", "4, 8, 16"), ("num_workers", 0))
    else:
        path = tmp_path / "bad.pt"
        write_bad_checkpoint(path, kind, tmp_path)
        if kind == "architecture":  # model_args that do not fit the weights
            checkpoint = torch.load(path, weights_only=True)
            checkpoint["model_args"]["features"] = [4, 8, 16]
            torch.save(checkpoint, path)
        message = run_main(predict, monkeypatch, ("predict_input_dir", tiny_raw), ("checkpoint", path),
                           ("prediction_dir", tmp_path / "p"), ("features", "4, 8"))
        assert not (tmp_path / "p").exists() or not list((tmp_path / "p").iterdir())
    assert str(path) in message and expected in message
    if kind == "architecture":  # the keys that do not fit and the settings that differ
        assert "wrong shape" in message and "encoders.0.0.weight" in message
        assert "features [2, 4] (checkpoint) vs [4, 8, 16] (now)" in message or \
               "features [4, 8, 16] (checkpoint) vs [4, 8] (now)" in message
    assert not (tmp_path / "pwned.txt").exists()


def test_every_load_in_the_scripts_is_weights_only():
    calls = 0
    for path in [*REPO.glob("*.py"), *REPO.glob("bratsunet/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"):
                continue
            owner = ast.unparse(node.func.value)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if owner == "torch":
                calls += 1
                assert keywords.get("weights_only") == "True", f"{path.name} line {node.lineno}"
            if owner in ("np", "numpy"):
                assert keywords.get("allow_pickle", "False") == "False", f"{path.name} line {node.lineno}"
    assert calls >= 1
