"""Settings as people read them: a script's --help (its job and the settings it reads), the key tables of
docs/settings.md, and the settings file a run leaves in its folder. hyperparameters.py parses and checks them.

The meanings and defaults come from one place, the trailing comments and values of the shipped hyperparameters.txt;
its `# ---- name ----` lines are the groups. Each script names the settings it reads in SETTINGS beside its job:
keys, or a group's name for all of its keys.
"""
import re
import sys
import textwrap
from datetime import datetime
from pathlib import Path

from bratsunet import hyperparameters
from bratsunet.files import atomic_write

GROUP = re.compile(r"# ---- (.+?)(?: \(.*\))? ----")  # "# ---- inference (predict.py) ----" -> inference
DOCS = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
TABLES_START = "<!-- key tables: made from hyperparameters.txt by settings_text.update_docs(); do not edit -->"
TABLES_END = "<!-- end of the key tables -->"


def layout(path=hyperparameters.DEFAULT_FILE):
    """[(group, [(key, default as written, meaning)])] of the shipped settings file, in its order."""
    groups = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        group = GROUP.fullmatch(line.strip())
        if group:
            groups.append((group.group(1), []))
        elif line.strip() and not line.startswith("#"):
            setting, _, meaning = re.sub(r"\s#\s*", "\0", line, count=1).partition("\0")  # `a#b` is no comment
            key, _, default = setting.partition(":")
            groups[-1][1].append((key.strip(), default.strip(), meaning.strip()))
    return groups


def script_keys(settings):
    """The keys of a script's SETTINGS (keys and group names), in the order of hyperparameters.txt."""
    groups = dict(layout())
    wanted = set()
    for name in settings:
        if name in groups:
            wanted |= {key for key, _, _ in groups[name]}
        elif name in hyperparameters.SCHEMA:
            wanted.add(name)
        else:
            raise ValueError(f"SETTINGS names {name!r}: neither a key nor a group of hyperparameters.txt")
    return [key for _, keys in groups.items() for key, _, _ in keys if key in wanted]


def help_text(script, doc, settings):
    """--help: usage, the script's job (its docstring) and the settings it reads, grouped, with default and meaning."""
    wanted = set(script_keys(settings))
    lines = [f"usage: python {script} [--hp FILE] [key=value ...]", "", textwrap.dedent(doc or "").strip(), "",
             textwrap.fill(f"Settings: hyperparameters.txt beside the scripts, then the file of --hp FILE (without "
                           f"it: of the environment variable {hyperparameters.ENVIRONMENT}, if set), then key=value. "
                           "This script reads (key, default, meaning; every key: docs/settings.md):", 116)]
    for group, keys in layout():
        rows = [(key, default or "(empty)", meaning) for key, default, meaning in keys if key in wanted]
        if rows:
            lines += ["", f"{group}:"] + [f"  {key:<22} {default:<22} {meaning}" for key, default, meaning in rows]
    return "\n".join(lines)


def from_command_line(doc, settings, argv=None):
    """A script's settings from its command line (hyperparameters.from_command_line); --help prints help_text."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(Path(sys.argv[0]).name or "SCRIPT.py", doc, settings))
        raise SystemExit(0)
    return hyperparameters.from_command_line(argv)


# ---------------------------------------------------------------- docs/settings.md

def _cell(text):
    return text.replace("|", "\\|")


def markdown_tables():
    """The key tables of docs/settings.md: a heading and a table of key, default and meaning per group."""
    parts = []
    for group, keys in layout():
        rows = [f"| `{key}` | {f'`{default}`' if default else '(empty)'} | {_cell(meaning)} |"
                for key, default, meaning in keys]
        parts.append("\n".join([f"### {group[0].upper()}{group[1:]}", "", "| key | default | meaning |",
                                "| --- | --- | --- |", *rows]))
    return "\n\n".join(parts)


def update_docs(path=DOCS):
    """Rewrite the key tables of docs/settings.md from hyperparameters.txt (tests/test_settings_text.py checks them)."""
    text = Path(path).read_text(encoding="utf-8")
    head, rest = text.split(TABLES_START)
    _, tail = rest.split(TABLES_END)
    Path(path).write_text(f"{head}{TABLES_START}\n\n{markdown_tables()}\n\n{TABLES_END}{tail}", encoding="utf-8")


# ---------------------------------------------------------------- the settings file a run leaves

def value_text(value):
    """A typed value as a settings file writes it: 1e-05, True, 48, 48, 48, a path; None as nothing."""
    if value is None:
        return ""
    if isinstance(value, (tuple, list)):
        return ", ".join(value_text(item) for item in value)
    return repr(value) if isinstance(value, float) else str(value)


def settings_file_text(hp, script):
    """Every setting of hp as a settings file in the layout of hyperparameters.txt: its groups, and each key's
    meaning; the keys that differ from the defaults say so. Paths are absolute."""
    values, defaults = hp.to_dict(), hyperparameters.load().to_dict()  # plain values: paths as text, lists
    lines = [f"# The settings {script} ran with, {datetime.now():%Y-%m-%d %H:%M}. Run it again with",
             f"#   python {script} --hp {{this file}}",
             "# (a trained run_dir is refused unless resume=True or overwrite=True)."]
    for group, keys in layout():
        lines += ["", f"# ---- {group} ----"]
        for key, _, meaning in keys:
            note = "" if values[key] == defaults[key] else f" [default: {value_text(defaults[key])}]"
            lines.append(f"{key + ': ' + value_text(values[key]):<38}  # {meaning}{note}")
    return "\n".join(lines) + "\n"


def write_settings_file(hp, path, script):
    """path <- settings_file_text; says so when a value cannot be read back the same (a path with ' #' in it)."""
    atomic_write(path, lambda tmp: tmp.write_text(settings_file_text(hp, script), encoding="utf-8"))
    try:
        again = hyperparameters.load(path).to_dict()
    except hyperparameters.HyperparameterError as error:
        again = {"error": str(error)}
    differ = [key for key, value in hp.to_dict().items() if again.get(key) != value]
    if differ:
        print(f"{path}: {', '.join(differ)} cannot be written so that --hp reads it back the same; "
              "the checkpoints hold every setting")
