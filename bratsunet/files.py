"""Safe file handling that every script shares: writes that are never half-done, output folders checked
before the work starts, one writer per folder, the names archivers and file browsers leave behind, and the
walk over a download's folders (links followed, each real folder once).
"""
import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

# What archivers, file browsers and operating systems leave beside the data, besides hidden names such as
# macOS's ._{file} copies of the metadata and .DS_Store: never a case, never a modality.
LEFTOVERS = {"__MACOSX", "Thumbs.db", "desktop.ini", "$RECYCLE.BIN", "System Volume Information", "@eaDir"}
TEMPORARY = re.compile(r"\.tmp\d+-.+")  # the names atomic_write gives its temporary files, and only those
LOCK = ".lock"  # held by the run that writes into a folder (sole_writer)
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # a full disk or quota, a read-only disk: every later write fails
ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".7z", ".rar")  # a download not yet unpacked


class WriteError(OSError):
    """A file could not be written (a full disk, a quota, a read-only disk): the later writes of a run would fail
    alike, so a run stops at the first one rather than report its cases as bad."""

    def __str__(self):  # the message alone, without "[Errno 28]"
        return str(self.strerror)


def is_leftover(name):
    return name.startswith(".") or name in LEFTOVERS


def nifti_stem(path):
    """A NIfTI file's name without .nii or .nii.gz (any case), None for other files."""
    for suffix in (".nii.gz", ".nii"):
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def folders_with_nifti(raw_dir):
    """Folders below raw_dir (itself included) that hold NIfTI files. Links are followed (shared data), but
    each real folder is visited once: a link back up (a loop) or a second way to a folder is not walked."""
    seen = set()
    for root, folders, files in os.walk(raw_dir, followlinks=True):
        status = os.stat(root)
        identity = (status.st_dev, status.st_ino) if status.st_ino else os.path.realpath(root)  # FAT: no inodes
        folders[:] = [] if identity in seen else [name for name in folders if not is_leftover(name)]
        if identity not in seen and any(nifti_stem(Path(f)) and not is_leftover(f) for f in files):
            yield Path(root)
        seen.add(identity)


def archives_in(folder):
    """The names of the archives directly in folder (a download to unpack first), sorted."""
    folder = Path(folder)
    return sorted(path.name for path in folder.iterdir() if path.is_file() and path.name.lower().endswith(ARCHIVES)
                  and not is_leftover(path.name)) if folder.is_dir() else []


def _disk_full(folder):
    """True when folder's disk has (almost) no room left: the cause of a failed write that gave no errno (numpy's
    short write, torch.save's zip writer). Asked while the partial file still takes its room."""
    try:
        return shutil.disk_usage(folder).free < 2 ** 20
    except OSError:
        return False


def atomic_write(path, write):
    """write(temporary_path) beside path, then rename into place: never a half-written file. Any OSError becomes
    a WriteError naming path."""
    path = Path(path)
    tmp = path.with_name(f".tmp{os.getpid()}-{path.name}")  # keeps the suffix (.npy, .nii.gz)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        number = error.errno if isinstance(error, OSError) else None
        if isinstance(error, OSError) and number is None and _disk_full(path.parent):
            number = errno.ENOSPC
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            reason = os.strerror(number) if number else (str(error).splitlines() or [type(error).__name__])[0]
            raise WriteError(number, f"cannot write {path}: {reason}") from error
        raise


def output_folder(folder, setting):
    """Create folder if needed and check that a file can be written in it, at the start of a run rather
    than after its work -> folder; OSError naming the folder and the setting otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"{folder}: cannot create {setting} ({error.strerror})") from None
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise OSError(f"{folder}: cannot write into {setting} ({error.strerror})") from None
    return folder


@contextlib.contextmanager
def sole_writer(folder, setting):
    """Hold folder's lock file while this run writes into it (after output_folder's checks): a second run on
    the same folder stops with a message rather than remove the first one's temporary files. Once the lock
    is held, the temporary files of a killed run are removed. The operating system drops the lock when the
    process ends, even on a SIGKILL, so no stale lock is ever left; the lock file goes when the run ends."""
    folder = output_folder(folder, setting)
    with _locked(folder / LOCK, f"{folder}: another run is writing into this {setting}; run again once it has "
                                "finished"):
        for path in folder.iterdir():
            if TEMPORARY.fullmatch(path.name) and path.is_file():
                path.unlink()
        yield folder


@contextlib.contextmanager
def _locked(path, busy):
    """Hold the lock file at path (OSError(busy) when another process holds it); the file is removed when done,
    so no run folder keeps it. Removed while still locked: a run that opened it meanwhile sees it is gone
    (another inode than the path's) and takes a new one."""
    while True:
        lock = open(path, "a")
        try:
            if os.name == "nt":
                import msvcrt
                msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            lock.close()
            raise OSError(busy) from None
        try:
            if os.name == "nt" or os.path.samestat(os.fstat(lock.fileno()), os.stat(path)):
                break
        except FileNotFoundError:  # removed by the run that held it: take the new one
            pass
        lock.close()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # Windows cannot remove a file that is open: it stays, unlocked
            if os.name != "nt":
                path.unlink()
        lock.close()


def same_or_inside(inner, outer):
    """True when folder inner is folder outer or lies inside it, however either is reached (links, letter case)."""
    inner = Path(inner).resolve()
    return Path(outer).exists() and any(
        folder.exists() and os.path.samefile(folder, outer) for folder in (inner, *inner.parents))
