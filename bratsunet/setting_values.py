"""How the text of a setting becomes its value, and the ranges a value may take: numbers, switches, lists,
choices and paths. Each converter takes text (from a file or the command line) or a Python value (from code) and
raises ValueError saying what was expected; hyperparameters.SCHEMA pairs them with the keys."""
import math
from pathlib import Path


def integer(value):
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError("an integer") from None
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) < 2 ** 63:  # what numpy and torch hold; a larger one would fail far from the setting
            return value
        raise ValueError("an integer below 2^63")
    raise ValueError("an integer")


def number(value):
    number = None
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    if number is None or not math.isfinite(number):  # inf or nan would train NaN weights
        raise ValueError("a finite number")
    return number


def switch(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError("True or False")


def nonempty_text(value):
    text = str(value).strip()
    if not text:
        raise ValueError("a non-empty text")
    return text


def optional(convert):
    def optional(value):
        if value is None or (isinstance(value, str) and value.strip() in ("", "None")):
            return None
        return convert(value)
    return optional


def auto_or(convert):
    def auto_or(value):
        if isinstance(value, str) and value.strip() == "auto":
            return "auto"
        try:
            return convert(value)
        except ValueError as error:
            raise ValueError(f"auto or {error}") from None
    return auto_or


def list_of(convert, length=None):
    def list_of(value):
        items = value.split(",") if isinstance(value, str) else list(value)
        items = [item for item in items if not (isinstance(item, str) and not item.strip())]
        if not items or (length is not None and len(items) != length):
            raise ValueError(f"{length or 'one or more'} comma-separated values")
        return tuple(convert(item) for item in items)
    return list_of


def choice(*choices):
    def choice(value):
        text = str(value).strip()
        if text not in choices:
            raise ValueError(" | ".join(choices))
        return text
    return choice


PATH = optional(lambda value: Path(str(value).strip()).expanduser())  # made absolute in hyperparameters._convert


def paths(value):
    """A path (a glob pattern too), or a tuple of them for a comma list (a list in code): one stays a plain path."""
    paths = list_of(PATH)([value] if isinstance(value, Path) else value)
    return paths[0] if len(paths) == 1 else paths


def positive(x):
    return x > 0 if not isinstance(x, tuple) else all(v > 0 for v in x)


def non_negative(x):
    return x >= 0


def fraction(x):
    return 0 <= x <= 1


def overlap(x):
    return 0 <= x <= 0.9  # windows per case grow as 1 / (1 - overlap)^3: 0.9 is 125x 0.5, 0.99 is 125,000x


def device_name(x):
    return x in ("auto", "cpu", "cuda", "mps") or (x.startswith("cuda:") and x[5:].isdigit())
