
import pytest

from bratsunet import hyperparameters
from bratsunet.hyperparameters import DEFAULT_FILE, SCHEMA, HyperparameterError, load


def write(tmp_path, text, name="hp.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_file_documents_every_key_once_with_a_comment():
    lines = [l for l in DEFAULT_FILE.read_text().splitlines() if l.strip() and not l.startswith("#")]
    keys = [l.split(":", 1)[0].strip() for l in lines]
    assert sorted(keys) == sorted(SCHEMA)
    assert all("#" in l for l in lines), "every key needs a trailing comment"


def test_defaults_are_typed():
    hp = load()
    assert hp.patch_size == (48, 48, 48) and isinstance(hp.patch_size[0], int)
    assert hp.channel_names == ("flair", "t1", "t1ce", "t2")
    assert hp.learning_rate == pytest.approx(3e-3) and isinstance(hp.learning_rate, float)
    assert hp.augment == "light" and hp.optimizer == "adamw" and hp.resume is False
    assert hp.checkpoint is None and hp.predict_input_dir is None
    assert hp.raw_data_dir == DEFAULT_FILE.parent / "data" / "raw"


def test_seed_format_is_still_valid(tmp_path):
    # The original example's style: key:value without spaces, comma lists, True/False, numbers.
    path = write(tmp_path, "patch_size:32,32,32\nbatch_size:1\naugment:False\nlearning_rate:0.001\n"
                           "channel_names:flair,t1,t1ce,t2\n")
    hp = load(path)
    assert (hp.patch_size, hp.batch_size, hp.augment, hp.learning_rate) == ((32, 32, 32), 1, "none", 0.001)


def test_comments_blank_lines_int_for_float_and_none(tmp_path):
    path = write(tmp_path, "# a comment\n\nlearning_rate: 1   # int where a float is expected\ncheckpoint: None\n")
    hp = load(path)
    assert hp.learning_rate == 1.0 and isinstance(hp.learning_rate, float)
    assert hp.checkpoint is None
    assert hp.epochs == load().epochs  # keys the file does not set keep their defaults


def test_unknown_key_names_line_and_closest_key(tmp_path):
    path = write(tmp_path, "epochs: 3\n\nlearnig_rate: 0.1\n")
    with pytest.raises(HyperparameterError, match=r"line 3: unknown key 'learnig_rate'; did you mean 'learning_rate'\?"):
        load(path)


@pytest.mark.parametrize("line, message", [
    ("epochs: 2.5", r"line 1: 'epochs' must be an integer, got '2.5'"),
    ("epochs: 0", r"line 1: 'epochs' must be > 0"),
    ("augment: yes", r"'augment' must be none \| light \| nnunet"),
    ("patch_size: 64, 64", r"'patch_size' must be 3 comma-separated values"),
    ("norm: layer", r"'norm' must be instance \| batch \| group"),
    ("sw_overlap: 0.99", r"'sw_overlap' must be >= 0 and <= 0.9"),
    ("learning_rate: inf", r"'learning_rate' must be a finite number, got 'inf'"),
    ("weight_decay: nan", r"'weight_decay' must be a finite number, got 'nan'"),
    ("learning_rate: 1e999", r"'learning_rate' must be a finite number"),  # overflows to inf
    ("seed: 4294967296", r"'seed' must be >= 0 and < 2\^32"),
    ("seed: 99999999999999999999999", r"'seed' must be an integer below 2\^63"),
    ("epochs: +-3", r"'epochs' must be an integer, got '\+-3'"),
    ("device: gpu", r"'device' must be auto, cpu, cuda, cuda:N or mps"),
    ("features: 16", r"'features' must be at least 2 levels"),
    ("just text", r"line 1: expected 'key: value'"),
])
def test_wrong_type_or_range_names_key_line_and_expectation(tmp_path, line, message):
    with pytest.raises(HyperparameterError, match=message):
        load(write(tmp_path, line + "\n"))


def test_duplicate_key_names_both_lines(tmp_path):
    with pytest.raises(HyperparameterError, match=r"line 3: duplicate key 'epochs' \(first set on line 1\)"):
        load(write(tmp_path, "epochs: 1\nseed: 1\nepochs: 2\n"))


def test_missing_file(tmp_path):
    with pytest.raises(HyperparameterError, match="not found"):
        load(tmp_path / "nope.txt")


def test_relative_paths_resolve_against_the_file_not_the_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "settings"
    folder.mkdir()
    path = write(folder, "raw_data_dir: ../brats\nrun_dir: runs/a\n")
    monkeypatch.chdir(tmp_path.parent)
    hp = load(path)
    assert hp.raw_data_dir == (tmp_path / "brats").resolve()
    assert hp.run_dir == folder / "runs" / "a"


def test_parsing_creates_nothing(tmp_path):
    path = write(tmp_path, "run_dir: out/run\nprepared_dir: out/prepared\n")
    load(path)
    assert list(tmp_path.iterdir()) == [path]


def test_command_line_overrides_are_validated_the_same_way(tmp_path, capsys):
    path = write(tmp_path, "epochs: 3\n")
    hp = hyperparameters.from_command_line(["--hp", str(path), "batch_size=4", "patch_size=32,32,16"])
    assert (hp.epochs, hp.batch_size, hp.patch_size) == (3, 4, (32, 32, 16))
    printed = capsys.readouterr().out
    assert "epochs=3" in printed and "batch_size=4" in printed and "seed" not in printed
    with pytest.raises(SystemExit, match=r"command line: unknown key 'epoch'; did you mean 'epochs'\?"):
        hyperparameters.from_command_line(["epoch=3"])
    with pytest.raises(SystemExit, match=r"command line: 'batch_size' must be an integer, got 'two'"):
        hyperparameters.from_command_line(["batch_size=two"])


def test_read_only_replace_and_round_trip_through_dict(tmp_path):
    hp = load()
    with pytest.raises(AttributeError, match="read-only"):
        hp.epochs = 1
    changed = hp.replace(epochs=2, run_dir=tmp_path, patch_size=[8, 8, 8])
    assert (changed.epochs, changed.run_dir, changed.patch_size, hp.epochs) == (2, tmp_path, (8, 8, 8), load().epochs)
    with pytest.raises(HyperparameterError, match="'epochs' must be > 0"):
        hp.replace(epochs=-1)
    plain = changed.to_dict()
    assert plain["run_dir"] == str(tmp_path) and plain["patch_size"] == [8, 8, 8]
    assert hyperparameters.from_dict(plain).to_dict() == plain


@pytest.mark.parametrize("content", [
    b"\xef\xbb\xbfepochs: 3\n",  # UTF-8 with the byte-order mark Windows Notepad writes
    "epochs: 3\n".encode("utf-16"),  # Notepad's "Unicode"
    b"# r\xe9sum\xe9 in Latin-1\nepochs: 3   # \xe9t\xe9\n",  # not UTF-8, but only in comments
], ids=["utf-8 bom", "utf-16", "latin-1 comments"])
def test_encodings_that_editors_write_are_read(tmp_path, content):
    path = tmp_path / "hp.txt"
    path.write_bytes(content)
    assert load(path).epochs == 3


def test_a_value_that_is_not_utf8_names_the_line_and_the_byte(tmp_path):
    path = tmp_path / "hp.txt"
    path.write_bytes(b"epochs: 3\nraw_data_dir: donn\xe9es   # Latin-1\n")
    with pytest.raises(HyperparameterError, match=r"^hp.txt line 2: byte 0xe9 is not UTF-8; save the file as UTF-8$"):
        load(path)


@pytest.mark.parametrize("value, expected", [
    ("data/raw#2", "data/raw#2"), ("data/raw #2", "data/raw"), ("#2", None), ("data/raw\t# note", "data/raw")])
def test_hash_starts_a_comment_by_the_same_rule_in_a_file_and_on_the_command_line(tmp_path, monkeypatch, value,
                                                                                   expected):
    monkeypatch.chdir(tmp_path)  # command-line paths are relative to it, file paths to the file: the same here
    from_file = load(write(tmp_path, f"raw_data_dir: {value}\n")).raw_data_dir
    typed = load(overrides=[f"raw_data_dir={value}"]).raw_data_dir
    assert from_file == typed == (None if expected is None else tmp_path / expected)


def test_relative_paths_typed_on_the_command_line_resolve_against_the_working_directory(tmp_path, monkeypatch):
    settings = write(tmp_path, "run_dir: runs/a\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    hp = hyperparameters.from_command_line(["--hp", str(settings), "prediction_dir=preds", "checkpoint=../c.pt"])
    assert hp.prediction_dir == work / "preds" and hp.checkpoint == tmp_path / "c.pt"
    assert hp.run_dir == tmp_path / "runs" / "a"  # the file's paths stay relative to the file
    assert hp.replace(prepared_dir="p").prepared_dir == tmp_path / "p"  # in code: relative to the file too
