"""Writing files the way users expect: atomically, with the umask's permissions, errors that name the path.

A file is written to a temp file in its own folder and renamed over the target, so readers see the old
file or the new one, never half of one, and a failed write (disk full, permission) leaves the old file
as it was. Temp files are named `.<name>.<host>.<pid>.<random>.tmp`; those of writers that were killed
(their process is gone) are removed by the next write of the same file.
"""

import glob
import os
import re
import secrets
import socket
import stat
import time
from contextlib import contextmanager
from pathlib import Path

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"
STALE_AGE_S = 24 * 3600  # temp files of other machines (or older versions) count as stale only this old


class WriteError(OSError):
    """A file could not be written; the message names it and says what was kept."""


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _is_stale(candidate: Path, prefix: str) -> bool:
    parts = candidate.name[len(prefix) : -len(".tmp")].split(".")
    if len(parts) == 3 and parts[0] == HOST and parts[1].isdigit():
        return not process_alive(int(parts[1]))
    try:  # another machine's writer may still be at work: only an old file is surely abandoned
        return time.time() - candidate.stat().st_mtime > STALE_AGE_S
    except FileNotFoundError:
        return False


def remove_stale_temps(path: Path) -> list:
    """Delete the temp files of `path` whose writer was killed; returns them."""
    prefix = f".{path.name}."
    stale = [p for p in path.parent.glob(glob.escape(prefix) + "*.tmp") if _is_stale(p, prefix)]
    for candidate in stale:
        candidate.unlink(missing_ok=True)
    return stale


def replace_problem(path: Path) -> str | None:
    """Why `path` must not be replaced (a folder, or a file its owner made read-only), or None."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISDIR(mode):
        return "it is a folder"
    if not mode & stat.S_IWUSR:
        return f"it is read-only (mode {stat.S_IMODE(mode):04o})"
    return None


def folder_problem(folder: Path) -> str | None:
    """Why files cannot be created in `folder` (or the folders that would be made for it), or None."""
    folder = Path(os.path.abspath(folder))
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def output_problem(path) -> str | None:
    """Why a file cannot be written at `path`, checked without writing anything, or None."""
    path = Path(path)
    return replace_problem(path) or folder_problem(path.parent)


def check_output(path, what: str):
    """ValueError before any work if `what` (e.g. '--results') cannot be written at `path`."""
    problem = output_problem(path)
    if problem:
        raise ValueError(f"{what} {path} cannot be written: {problem}")


def check_output_dir(path, what: str):
    path = Path(path)
    problem = ("it is a file" if path.exists() and not path.is_dir() else None) or folder_problem(path)
    if problem:
        raise ValueError(f"{what} {path} cannot be written: {problem}")


def check_readable_folder(folder, what: str = "folder"):
    """ValueError naming `folder` if its files cannot be listed or opened (permission denied): a folder
    that cannot be read must not look empty."""
    denied = not os.access(folder, os.R_OK | os.X_OK)
    if not denied:
        try:
            with os.scandir(folder):
                pass
        except PermissionError:
            denied = True
    if denied:
        raise ValueError(f"{what} {folder} is not readable (permission denied)")


# ----------------------------------------------------------------------------- replacing files
# An output that exists is replaced only if it is a file of the kind being written (a results JSON by a
# results JSON, a NIR file by a NIR file): never a checkpoint or a file the project did not write as that
# kind. The kind is told by the file's content, never by its name.
def check_replace(path, what: str, kind: str, matches):
    """ValueError before any work if an existing file at `path` is not of `kind` (e.g. 'a results JSON
    of test.py'): `matches(path)` says whether it is; it must not raise."""
    path = Path(path)
    if not path.is_file() or matches(path):
        return
    raise ValueError(
        f"{what} {path} exists and is not {kind}: it is not replaced (nothing was written); "
        f"write to another path, or move the file away first"
    )


def starts_with(path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def is_text(path, limit: int = 1 << 16) -> bool:
    """A text file (its first `limit` bytes UTF-8, no NUL byte): a list or a log, never a checkpoint."""
    try:
        with open(path, "rb") as f:
            head = f.read(limit)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start >= limit - 4  # a character cut at the limit
    return True


def is_image(path) -> bool:
    """An image file that PIL can read (its header checked, the pixels not decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return False
    return True


def _discard(tmp: Path):
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass


def _sync_folder(folder: Path):
    """Make the rename itself durable; some file systems cannot sync a folder, which is no error."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path):
    """A temp path next to `path` for the block to write by name; renamed over `path` if the block succeeds,
    deleted otherwise. OSErrors become one WriteError naming `path` and what was kept."""
    path = Path(path)
    problem = replace_problem(path)
    if problem:
        raise WriteError(f"cannot write {path}: {problem}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
    except OSError as err:
        raise WriteError(f"cannot write {path}: {err.strerror or err}") from None
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except WriteError:
        _discard(tmp)
        raise
    except OSError as err:
        _discard(tmp)
        kept = "the previous file is unchanged" if path.exists() else "nothing was written"
        raise WriteError(f"cannot write {path}: {err.strerror or err}; {kept}") from err
    except BaseException:
        _discard(tmp)
        raise
    _sync_folder(path.parent)


def atomic_write(path, write):
    """Write `path` atomically through `write(binary file)`; a new file gets mode 0666 minus the umask."""
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_bytes(path, data: bytes):
    atomic_write(path, lambda f: f.write(data))
