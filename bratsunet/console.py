"""What the console shows: the one stream of every progress bar, and the copy of a run's console that its folder keeps.

Progress bars go to stdout in an IDE's console (Spyder, PyCharm, Jupyter: there stderr shows red and keeps the
blank line a cleared bar leaves) and to stderr in a terminal, so that `python train.py > out.txt` keeps no bars.
Each bar is cleared when done: the line that reports the result takes its place.
"""
import os
import sys

from tqdm import tqdm


def in_ide():
    """True in an IPython console (Spyder, Jupyter, PyCharm's Python console) or a PyCharm run."""
    return "IPython" in sys.modules or bool(os.environ.get("PYCHARM_HOSTED"))


def progress_bar(iterable=None, total=None, description=None, unit="it", disable=False):
    """A tqdm bar on the stream of every bar (stdout in an IDE, else stderr), cleared when done."""
    return tqdm(iterable, total=total, desc=description, unit=unit, disable=disable, leave=False,
                file=sys.stdout if in_ide() else sys.stderr)


class KeptConsole:
    """`with KeptConsole() as kept:` copies what this process prints (stdout and stderr, warnings included) into
    a file from kept.keep_in(path) on, lines printed before it first. A line is kept as the console shows it when
    it ends: text before a carriage return was overwritten, so progress bars leave nothing. enabled=False (the
    other processes under torchrun) keeps nothing."""

    def __init__(self, enabled=True):
        self.enabled, self.lines, self.file = enabled, [], None

    def __enter__(self):
        if self.enabled:
            self.streams = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = _Copy(sys.stdout, self), _Copy(sys.stderr, self)
        return self

    def keep_in(self, path, append=False):
        """Write the lines so far to path (after what it holds with append) and every later line as it comes."""
        if self.enabled:
            self.file = open(path, "a" if append else "w", encoding="utf-8", errors="backslashreplace")
            self.file.writelines(self.lines)
            self.file.flush()

    def add(self, line):
        if self.file is None:
            self.lines.append(line)
        else:  # flushed at once: a forked DataLoader worker must not inherit unwritten lines and write them again
            self.file.write(line)
            self.file.flush()

    def __exit__(self, kind, error, traceback):
        if not self.enabled:
            return
        sys.stdout, sys.stderr = self.streams
        if error is not None:  # the console shows it after this, from the script's main()
            self.add(f"stopped: {kind.__name__}{f': {error}' if str(error) else ''}\n")
        if self.file is not None:
            self.file.close()


class _Copy:
    """A console stream that also hands every finished line to a KeptConsole."""

    def __init__(self, console, kept):
        self.console, self.kept, self.line = console, kept, ""

    def write(self, text):
        written = self.console.write(text)
        *ended, self.line = (self.line + text).split("\n")
        for line in ended:
            self.kept.add(line.rstrip("\r").rsplit("\r", 1)[-1].rstrip() + "\n")
        self.line = self.line[self.line.rstrip("\r").rfind("\r") + 1:]  # what a bar overwrote is gone
        return written

    def __getattr__(self, name):  # flush, isatty, fileno, encoding: the console's
        return getattr(self.console, name)
