"""bratsunet/settings_text.py: each script's --help lists the settings it really reads, docs/settings.md's key tables
are those of hyperparameters.txt, the settings file a run leaves reads back the same, BRATSUNET_HP."""
import importlib
import re
import subprocess
import sys

import pytest

from conftest import REPO
from bratsunet import hyperparameters, settings_text
from bratsunet.hyperparameters import Hyperparameters

SCRIPTS = ("prepare_dataset", "train", "predict", "evaluate", "rendering", "export", "synthetic", "demo", "crossval")


@pytest.fixture
def reads(monkeypatch):
    """The keys read from the settings: every hp.key looked up, except keys the code itself set (hp.replace or
    hp.updated, e.g. the settings a checkpoint brings, or train.py's run_dir/fold_K). Cleared by the test between
    scripts."""
    seen, updated, lookup = set(), Hyperparameters.updated, Hyperparameters.__getattr__

    def recording(self, key):
        if key not in self.__dict__.get("_set_in_code", ()):
            seen.add(key)
        return lookup(self, key)

    def tracking(self, changes, where, base_dir=None):
        copy = updated(self, changes, where, base_dir)
        in_code = set() if where == "command line" else set(changes)  # replace(), a checkpoint's settings
        object.__setattr__(copy, "_set_in_code", self.__dict__.get("_set_in_code", set()) | in_code)
        return copy

    monkeypatch.setattr(Hyperparameters, "__getattr__", recording)
    monkeypatch.setattr(Hyperparameters, "updated", tracking)
    return seen


def listed(script):
    return set(settings_text.script_keys(importlib.import_module(script).SETTINGS))


def test_each_script_reads_only_the_settings_its_help_lists(tmp_path, tiny_raw, reads, monkeypatch):
    import crossval
    import evaluate
    import predict
    import prepare_dataset
    import rendering
    import train
    monkeypatch.setattr(rendering, "has_display", lambda: False)
    hp = hyperparameters.load(overrides={
        "raw_data_dir": tiny_raw, "prepared_dir": tmp_path / "prepared", "run_dir": tmp_path / "run",
        "prediction_dir": tmp_path / "predictions", "num_workers": 0, "features": "4, 8, 16",
        "patch_size": "16, 16, 16", "epochs": 1, "steps_per_epoch": 2, "val_fraction": 0.34, "test_fraction": 0.2,
        "render_output": None})
    found = {}
    for script, job in (("prepare_dataset", prepare_dataset.prepare_dataset), ("train", train.train),
                        ("predict", predict.predict), ("evaluate", evaluate.evaluate),
                        ("rendering", rendering.render), ("crossval", crossval.crossval)):
        reads.clear()
        job(hp)
        found[script] = set(reads)
        assert found[script] <= listed(script), f"{script} reads {sorted(found[script] - listed(script))}"
    assert {"patch_size", "learning_rate", "epochs", "run_dir"} <= found["train"]  # the recording sees reads
    assert "patch_size" not in found["predict"]  # the checkpoint's, not the file's


def test_help_shows_the_job_and_each_setting_read_with_default_and_meaning():
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    text = done.stdout
    assert text.startswith("usage: python train.py [--hp FILE] [key=value ...]\n\nTrain the 3D U-Net")
    meaning = dict((key, (default, meaning)) for _, keys in settings_text.layout() for key, default, meaning in keys)
    shown = re.findall(r"^  (\w+) +(.+?) {2,}(.+)$", text, flags=re.M)
    assert {key for key, _, _ in shown} == listed("train")
    for key, default, text_meaning in shown:
        assert (default.strip(), text_meaning) == (meaning[key][0] or "(empty)", meaning[key][1])
    assert re.search(r"^training:\n  patch_size +48, 48, 48 +training patch", text, flags=re.M)
    assert "raw_data_dir" not in text.split("This script reads")[1]  # not read by train.py


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help_with_its_settings(script):
    module = importlib.import_module(script)
    source = (REPO / f"{script}.py").read_text()
    assert "settings_text.from_command_line(__doc__, SETTINGS)" in source  # what main() runs first
    text = settings_text.help_text(f"{script}.py", module.__doc__, module.SETTINGS)
    assert module.__doc__.strip().splitlines()[0] in text and listed(script)


def test_docs_settings_tables_are_those_of_hyperparameters_txt():
    docs = (REPO / "docs" / "settings.md").read_text(encoding="utf-8")
    tables = docs.split(settings_text.TABLES_START)[1].split(settings_text.TABLES_END)[0].strip()
    assert tables == settings_text.markdown_tables(), (
        "docs/settings.md's key tables differ from hyperparameters.txt: run "
        "python -c 'from bratsunet import settings_text; settings_text.update_docs()'")
    assert all(f"| `{key}` |" in tables for key in hyperparameters.SCHEMA)


def test_settings_file_of_a_run_reads_back_the_same(tmp_path):
    hp = hyperparameters.load(overrides={"epochs": 3, "learning_rate": 1e-4, "patch_size": "32, 32, 16",
                                         "checkpoint": "a.pt, b.pt", "et_min_voxels": None, "augment": "nnunet",
                                         "run_dir": tmp_path / "run dir#1"})
    path = tmp_path / "settings.txt"
    settings_text.write_settings_file(hp, path, "train.py")
    again = hyperparameters.from_command_line(["--hp", str(path)])
    assert again.to_dict() == hp.to_dict()
    text = path.read_text()
    assert re.search(r"^epochs: 3 +# training epochs \[default: 12\]$", text, flags=re.M)
    assert "# ---- training ----" in text and "python train.py --hp" in text


def test_a_value_that_cannot_be_written_back_is_named(tmp_path, capsys):
    hp = hyperparameters.load(overrides={"run_dir": tmp_path / "runs #2", "prediction_dir": tmp_path / "p"})  # " #" starts a comment
    settings_text.write_settings_file(hp, tmp_path / "settings.txt", "train.py")
    assert "run_dir cannot be written so that --hp reads it back the same" in capsys.readouterr().out


def test_settings_file_from_the_environment_unless_hp_is_given(tmp_path, monkeypatch, capsys):
    mine, other = tmp_path / "mine.txt", tmp_path / "other.txt"
    mine.write_text("epochs: 7\n")
    other.write_text("epochs: 9\n")
    monkeypatch.setenv("BRATSUNET_HP", str(mine))
    assert hyperparameters.from_command_line([]).epochs == 7
    assert f"settings file {mine} (from BRATSUNET_HP)" in capsys.readouterr().out
    assert hyperparameters.from_command_line(["--hp", str(other)]).epochs == 9  # --hp wins
    assert hyperparameters.from_command_line(["epochs=2"]).epochs == 2
    monkeypatch.setenv("BRATSUNET_HP", str(tmp_path / "missing.txt"))
    with pytest.raises(SystemExit, match=r"hyperparameter file not found \(BRATSUNET_HP=.*missing.txt\)$"):
        hyperparameters.from_command_line([])
    assert hyperparameters.load().epochs == 12  # the library's defaults never follow the environment
