"""Read hyperparameters.txt into one typed, validated, read-only object.

The defaults are the values in the hyperparameters.txt beside the scripts; this module knows each key's type
and valid range, and takes the choices of a setting from the module that implements them (a new loss in
losses.LOSSES is a valid `loss` at once). Another file (--hp FILE) may set any subset of the keys; command-line
`key=value` overrides are checked the same way. Parsing has no side effects (no folders are made).

`#` starts a comment at the start of a line or of a value, or after whitespace, in a file and on the
command line alike: `raw_data_dir: data/raw#2` keeps its `#`. Relative paths in a file are relative to
the file's folder, relative paths typed on the command line to the working directory.
"""
import codecs
import difflib
import os
import re
import sys
from pathlib import Path

from bratsunet import augmentation, conventions, loader, losses, network
from bratsunet.setting_values import (PATH, auto_or, choice, device_name, fraction, integer, list_of,
                                      non_negative, nonempty_text, number, optional, overlap, paths, positive,
                                      switch)

DEFAULT_FILE = Path(__file__).resolve().parents[1] / "hyperparameters.txt"  # beside the scripts


class HyperparameterError(ValueError):
    pass


def _augment(value):
    """none | light | nnunet; True and False (settings from before the three modes) mean light and none."""
    if isinstance(value, bool) or str(value).strip().lower() in ("true", "false"):
        return "light" if switch(value) else "none"
    return choice(*augmentation.MODES)(value)


# key -> (converter, range check or None, what the range check demands)
SCHEMA = {
    "raw_data_dir": (PATH, None, ""),
    "prepared_dir": (PATH, None, ""),
    "run_dir": (PATH, None, ""),
    "prediction_dir": (PATH, None, ""),
    "channel_names": (list_of(nonempty_text), None, ""),
    "seg_channel_name": (nonempty_text, None, ""),
    "data_format": (choice(*conventions.DATA_FORMATS), None, ""),
    "allow_any_grid": (switch, None, ""),
    "bg_threshold": (number, fraction, "between 0 and 1"),
    "crop_margin": (integer, non_negative, ">= 0"),
    "val_fraction": (number, lambda x: 0 <= x < 1, ">= 0 and < 1"),
    "test_fraction": (number, lambda x: 0 <= x < 1, ">= 0 and < 1"),
    "num_folds": (integer, positive, "> 0"),
    "fold": (integer, non_negative, ">= 0"),
    "seed": (integer, lambda x: 0 <= x < 2 ** 32, ">= 0 and < 2^32 (numpy's seed range)"),
    "synthetic_cases": (integer, positive, "> 0"),
    "synthetic_shape": (list_of(integer, 3), lambda s: min(s) >= 16, "each side >= 16"),
    "synthetic_compress": (switch, None, ""),
    "synthetic_style": (choice("phantom", "randomized", "anatomy"), None, ""),
    "anatomy_dir": (PATH, None, ""),
    "features": (list_of(integer), lambda f: len(f) >= 2 and positive(f), "at least 2 levels, each > 0"),
    "norm": (choice(*network.NORMS), None, ""),
    "deep_supervision": (switch, None, ""),
    "downsampling": (choice(*network.DOWNSAMPLING), None, ""),
    "target": (choice(*losses.TARGETS), None, ""),
    "loss": (choice(*losses.LOSSES), None, ""),
    "batch_dice": (switch, None, ""),
    "dice_smooth": (number, positive, "> 0"),
    "patch_size": (list_of(integer, 3), lambda s: all(0 < side <= 512 for side in s), "each between 1 and 512"),
    "batch_size": (integer, positive, "> 0"),
    "optimizer": (choice("adamw", "sgd"), None, ""),
    "learning_rate": (number, positive, "> 0"),
    "momentum": (number, lambda x: 0 <= x < 1, ">= 0 and < 1"),
    "weight_decay": (number, non_negative, ">= 0"),
    "lr_schedule": (choice("poly", "cosine", "constant"), None, ""),
    "warmup_epochs": (integer, non_negative, ">= 0"),
    "epochs": (integer, positive, "> 0"),
    "steps_per_epoch": (integer, positive, "> 0"),
    "val_every": (integer, positive, "> 0"),
    "foreground_fraction": (number, fraction, "between 0 and 1"),
    "patch_sampling": (choice(*loader.SAMPLING), None, ""),
    "augment": (_augment, None, ""),
    "augment_on": (choice(*augmentation.PLACES), None, ""),
    "grad_clip": (number, non_negative, ">= 0"),
    "num_workers": (integer, non_negative, ">= 0"),
    "device": (nonempty_text, device_name, "auto, cpu, cuda, cuda:N or mps"),
    "precision": (choice("auto", "bf16", "fp16", "fp32"), None, ""),
    "channels_last": (auto_or(switch), None, ""),
    "compile": (switch, None, ""),
    "resume": (switch, None, ""),
    "save_every": (integer, positive, "> 0"),
    "tensorboard": (switch, None, ""),
    "checkpoint": (optional(paths), None, ""),
    "predict_input_dir": (PATH, None, ""),
    "sw_overlap": (number, overlap, ">= 0 and <= 0.9"),
    "sw_batch_size": (integer, positive, "> 0"),
    "tta_mirror": (switch, None, ""),
    "et_min_voxels": (optional(integer), non_negative, ">= 0"),
    "et_search_max": (integer, non_negative, ">= 0"),
    "save_probabilities": (switch, None, ""),
    "overwrite": (switch, None, ""),
    "lesion_wise": (switch, None, ""),
    "lesion_wise_task": (choice("gli", "mets", "MenPre", "GoAT"), None, ""),
    "backend": (choice("torch", "onnxruntime"), None, ""),
    "rendering_sample_name": (optional(nonempty_text), None, ""),
    "render_output": (PATH, None, ""),
    "render_modality": (nonempty_text, None, ""),
    "render_errors": (switch, None, ""),
    "render_turntable": (PATH, None, ""),
}


def _convert(key, value, base_dir, where):
    """One value -> its typed form; errors name where it came from and what was expected."""
    if key not in SCHEMA:
        close = difflib.get_close_matches(key, SCHEMA, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise HyperparameterError(f"{where}: unknown key '{key}'{hint}")
    convert, check, demand = SCHEMA[key]
    try:
        typed = convert(value)
    except (ValueError, TypeError) as error:
        raise HyperparameterError(f"{where}: '{key}' must be {error}, got {value!r}") from None
    if typed is not None and check is not None and not check(typed):
        raise HyperparameterError(f"{where}: '{key}' must be {demand}, got {value!r}")
    if isinstance(typed, Path) and not typed.is_absolute():
        typed = (base_dir / typed).resolve()
    if isinstance(typed, tuple) and all(isinstance(path, Path) for path in typed):  # a comma list of paths
        typed = tuple(path if path.is_absolute() else (base_dir / path).resolve() for path in typed)
        whole = PATH(value) if isinstance(value, str) else None
        if whole is not None and (base_dir / whole).exists():  # a file whose name holds a comma: taken as named
            typed = (base_dir / whole).resolve()
    return typed


def _uncomment(text):
    """text without its comment: `#` at the start or after whitespace begins one, `a#b` is kept."""
    return re.split(r"(?:^|\s)#", text, maxsplit=1)[0].strip()


def _decode(data):
    """Text of a settings file: UTF-8 with or without a byte-order mark (Windows Notepad), or UTF-16.
    Bytes that are not UTF-8 become surrogates, harmless in comments and refused in values."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    return data.decode("utf-8-sig", "surrogateescape")


def read_file(path):
    """The typed values a settings file sets (a subset of the keys is fine)."""
    path = Path(path)
    if not path.is_file():
        raise HyperparameterError(f"{path}: hyperparameter file not found")
    values, seen = {}, {}
    for line_number, line in enumerate(_decode(path.read_bytes()).splitlines(), start=1):
        line = _uncomment(line)
        if not line:
            continue
        where = f"{path.name} line {line_number}"
        if ":" not in line:
            raise HyperparameterError(f"{where}: expected 'key: value', got {line!r}")
        key, value = line.split(":", 1)
        key, value = key.strip(), _uncomment(value)  # `key:#x` is a key without a value, as `key=#x`
        undecodable = re.search("[\udc80-\udcff]", key + value)
        if undecodable:
            raise HyperparameterError(f"{where}: byte 0x{ord(undecodable.group()) - 0xdc00:02x} is not UTF-8; "
                                      "save the file as UTF-8")
        if key in seen:
            raise HyperparameterError(f"{where}: duplicate key '{key}' (first set on line {seen[key]})")
        seen[key] = line_number
        values[key] = _convert(key, value, path.resolve().parent, where)
    return values


class Hyperparameters:
    """Read-only settings: `hp.learning_rate`; `hp.replace(epochs=1)` gives a validated copy."""

    def __init__(self, values, base_dir):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_base_dir", Path(base_dir))

    def __getattr__(self, key):
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"no hyperparameter '{key}'") from None

    def __setattr__(self, key, value):
        raise AttributeError("hyperparameters are read-only: use hp.replace(key=value) or a key=value override")

    def __repr__(self):
        return "Hyperparameters(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"

    def replace(self, **changes):
        return self.updated(changes, "replace()")

    def updated(self, changes, where, base_dir=None):
        """A validated copy with changes; their relative paths against base_dir (default: the file's folder)."""
        values = dict(self._values)
        values.update({k: _convert(k, v, base_dir or self._base_dir, where) for k, v in changes.items()})
        return Hyperparameters(values, self._base_dir)

    def to_dict(self):
        """Plain JSON-able values (paths as text, lists as lists), e.g. for checkpoints."""
        def plain(value):
            return str(value) if isinstance(value, Path) else [plain(v) for v in value] if isinstance(value, tuple) \
                else value
        return {key: plain(value) for key, value in self._values.items()}


# The demo's folders, as hyperparameters.txt ships them (relative to it)
DEMO_FOLDERS = {"raw_data_dir": "data/raw", "prepared_dir": "data/prepared", "run_dir": "runs/demo",
                "prediction_dir": "runs/demo/predictions"}


def own_folders(values):
    """{key: folder} for the folders left at the demo's while the data is another: with a raw_data_dir other than
    the demo's, prepared_dir becomes data/{its name}_prepared and run_dir runs/{its name}; prediction_dir follows
    run_dir (run_dir/predictions). A dataset's arrays, runs and predictions never land in the demo's folders.
    values: the typed settings {key: value} (read here, not by the script)."""
    demo = {key: DEFAULT_FILE.parent / folder for key, folder in DEMO_FOLDERS.items()}
    own, name = {}, values["raw_data_dir"].name if values["raw_data_dir"] else ""
    if values["raw_data_dir"] not in (None, demo["raw_data_dir"]):
        own.update({key: folder for key, folder in (("prepared_dir", demo["raw_data_dir"].parent / f"{name}_prepared"),
                                                    ("run_dir", demo["run_dir"].parent / name))
                    if values[key] == demo[key]})
    run_dir = own.get("run_dir", values["run_dir"])
    if values["prediction_dir"] == demo["prediction_dir"] and run_dir != demo["run_dir"]:
        own["prediction_dir"] = run_dir / "predictions"
    return own


def load(path=None, overrides=None):
    """Defaults, then the settings file (if another), then overrides: {key: value} (relative paths
    against the file's folder) or ["key=value"] as typed on a command line (against the working directory).
    Folders left at the demo's follow another raw_data_dir (own_folders)."""
    values = read_file(DEFAULT_FILE)
    missing = set(SCHEMA) - set(values)
    if missing:
        raise HyperparameterError(f"{DEFAULT_FILE}: missing keys {sorted(missing)}")
    path = Path(path).resolve() if path else DEFAULT_FILE
    if path != DEFAULT_FILE:
        values.update(read_file(path))
    hp = Hyperparameters(values, path.parent)
    if isinstance(overrides, (list, tuple)):
        hp = hp.updated(dict(_split_override(item) for item in overrides), "command line", Path.cwd())
    else:
        hp = hp.updated(overrides or {}, "command line")
    return hp.updated(own_folders(hp._values), "own_folders")


def _split_override(item):
    if "=" not in item:
        raise HyperparameterError(f"command line: expected key=value or --hp FILE, got {item!r}")
    key, value = item.split("=", 1)
    return key.strip().lstrip("-"), _uncomment(value)


def from_dict(values):
    """Rebuild from `to_dict()` output (e.g. the settings stored in a checkpoint)."""
    return load().replace(**values)


def differences(hp):
    """{key: value} of the settings that differ from the shipped defaults."""
    defaults = load().to_dict()
    return {k: v for k, v in hp.to_dict().items() if v != defaults[k]}


ENVIRONMENT = "BRATSUNET_HP"  # a settings file for every script without --hp (an IDE's run configuration, a shell)


def from_command_line(argv=None):
    """Parse `[--hp FILE] [key=value ...]` (without --hp: the file the environment variable BRATSUNET_HP names,
    if set), print the settings that differ from the defaults. settings_text.from_command_line adds --help."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = os.environ.get(ENVIRONMENT) or None
    from_environment = path is not None
    if "--hp" in argv:  # wins over the environment
        at = argv.index("--hp")
        if at + 1 >= len(argv):
            raise SystemExit("error: command line: --hp needs a file")
        path, from_environment = argv[at + 1], False
        del argv[at:at + 2]
    try:
        hp = load(path, overrides=argv)
    except HyperparameterError as error:
        raise SystemExit(f"error: {error}" + f" ({ENVIRONMENT}={path})" * from_environment) from None
    if hasattr(sys.stdout, "reconfigure"):  # a folder name that is not UTF-8 prints as \udcNN, not a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    changed = differences(hp)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        if from_environment:
            print(f"settings file {path} (from {ENVIRONMENT})")
        if changed:
            print("settings that differ from the defaults: " + ", ".join(f"{k}={v}" for k, v in changed.items()))
    return hp
