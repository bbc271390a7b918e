"""bratsunet/console.py: every progress bar on one stream, and the run's log.txt: the console as it was shown,
without bars, kept from before the run folder exists, appended on resume; the settings.txt beside it."""
import ast
import sys
import warnings

import pytest
from tqdm import tqdm

import train
from conftest import REPO
from bratsunet import console, hyperparameters, training


@pytest.fixture
def warnings_to_stderr(monkeypatch):
    """Warnings printed to sys.stderr as Python prints them outside pytest (which records them instead)."""
    monkeypatch.setattr(warnings, "showwarning", lambda message, category, filename, lineno, file=None, line=None:
                        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line)))


def test_the_kept_console_is_what_was_shown_without_progress_bars(tmp_path, capsys, warnings_to_stderr):
    log = tmp_path / "log.txt"
    stdout = sys.stdout
    with console.KeptConsole() as kept:
        print("before the folder")  # kept in memory until keep_in
        kept.keep_in(log)
        bar = console.progress_bar(total=3, description="epoch 1/2")
        for step in range(3):
            if step == 1:
                tqdm.write("non-finite loss at epoch 1 step 2: skipped")  # between two draws of the bar
            bar.update()
        bar.close()
        print("epoch 1/2  loss 0.5")
        warnings.warn("a warning")
    assert sys.stdout is stdout
    shown = capsys.readouterr()
    assert "epoch 1/2:" in shown.err and "epoch 1/2  loss 0.5" in shown.out  # the console had the bar
    lines = log.read_text().splitlines()
    assert lines[:3] == ["before the folder", "non-finite loss at epoch 1 step 2: skipped", "epoch 1/2  loss 0.5"]
    assert "UserWarning: a warning" in lines[3] and "%|" not in log.read_text() and "\r" not in log.read_text()


def test_an_error_ends_the_log_with_its_line_and_disabled_keeps_nothing(tmp_path):
    with pytest.raises(ValueError):
        with console.KeptConsole() as kept:
            kept.keep_in(tmp_path / "log.txt")
            print("epoch 1/2  loss 0.5")
            raise ValueError("epoch 2: the weights became NaN")
    assert (tmp_path / "log.txt").read_text().splitlines() == [
        "epoch 1/2  loss 0.5", "stopped: ValueError: epoch 2: the weights became NaN"]
    stdout = sys.stdout
    with console.KeptConsole(enabled=False) as kept:  # the other processes under torchrun
        assert sys.stdout is stdout
        kept.keep_in(tmp_path / "other.txt")
    assert not (tmp_path / "other.txt").exists()


@pytest.mark.parametrize("ide", [None, "ipython", "pycharm"])
def test_every_bar_goes_to_the_one_stream_of_its_console(monkeypatch, ide):
    monkeypatch.delenv("PYCHARM_HOSTED", raising=False)
    if ide == "pycharm":
        monkeypatch.setenv("PYCHARM_HOSTED", "1")
    if ide == "ipython":
        monkeypatch.setitem(sys.modules, "IPython", sys)
    else:
        monkeypatch.delitem(sys.modules, "IPython", raising=False)
    bar = console.progress_bar(total=1)
    bar.close()
    assert bar.fp == (sys.stderr if ide is None else sys.stdout)  # tqdm's wrapper compares as its stream


def test_no_bar_is_made_outside_console_py():
    """Every bar comes from console.progress_bar: one stream, one look (no other tqdm())."""
    for path in [*REPO.glob("*.py"), *(REPO / "bratsunet").glob("*.py")]:
        if path.name == "console.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "tqdm":
                pytest.fail(f"{path.name} line {node.lineno}: a tqdm bar of its own; use console.progress_bar")


def test_a_run_folder_keeps_its_log_and_settings_and_a_resume_appends(tmp_path, tiny_prepared, monkeypatch,
                                                                       warnings_to_stderr):
    hp = hyperparameters.load(overrides={
        "prepared_dir": tiny_prepared, "run_dir": tmp_path / "run", "num_workers": 0, "features": "4, 8, 16",
        "patch_size": "16, 16, 16", "epochs": 2, "steps_per_epoch": 2, "seed": 3})
    epoch = training.train_epoch

    def warning_in_epoch_1(*args):
        if args[9] == 1:  # epoch
            warnings.warn("the loader is slow")
        return epoch(*args)

    monkeypatch.setattr(training, "train_epoch", warning_in_epoch_1)
    train.train(hp)
    first = (hp.run_dir / "log.txt").read_text()
    lines = first.splitlines()
    assert lines[0].startswith("training on cpu x 1 process(es)")
    assert [line[:10] for line in lines if line.startswith("epoch ")] == ["epoch 1/2 ", "epoch 2/2 "]
    assert any("UserWarning: the loader is slow" in line for line in lines)
    assert lines[-1].startswith("predicted 2 validation case(s) into ")
    assert "%|" not in first and "\r" not in first
    again = hyperparameters.from_command_line(["--hp", str(hp.run_dir / "settings.txt")])
    assert again.to_dict() == hp.to_dict()  # `python train.py --hp run_dir/settings.txt` runs the same settings

    train.train(hp.replace(resume=True, epochs=3))
    log = (hp.run_dir / "log.txt").read_text()
    assert log.startswith(first)
    added = log[len(first):].splitlines()
    assert added[0].startswith(f"resuming {hp.run_dir / 'checkpoint_last.pt'} after epoch 2; changed: epochs 2 -> 3")
    assert [line[:10] for line in added if line.startswith("epoch ")] == ["epoch 3/3 "]
    assert hyperparameters.load(hp.run_dir / "settings.txt").epochs == 3
