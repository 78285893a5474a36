"""Crash-safe file writing (write to a temporary file beside the target, then rename), and reading
the user's text files with one-line errors.

A reader therefore sees either the old file or the complete new one, never a half-written one,
even if the process is killed mid-write.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from vall_e.utils.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success, fsync and rename it onto `path`.

    The temporary name keeps the target's suffix (or `suffix`) so libraries that pick a format by
    extension (soundfile, h5py) still work. On error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sfx = suffix if suffix is not None else "".join(path.suffixes[-1:])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{sfx}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file's content (a leading byte-order mark dropped). A missing, unreadable or
    non-UTF-8 file is a one-line UserError naming it: `{path}: {what} not found`, `cannot read (...)`,
    `not UTF-8 text (bad byte at offset N)`."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


# `atomic_path`'s temporary names: "." + target name + "." + mkstemp's 8 random characters + ".tmp" + suffix
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>\.[^.]*)?$")


def remove_stale_temps(folder: str | os.PathLike, target_suffix: str, recursive: bool = False,
                       exact: bool = False) -> int:
    """Delete the temporary files `atomic_path` left for targets ending in `target_suffix` (named
    exactly `target_suffix` with `exact`); return how many.

    A process killed mid-write (SIGKILL, power loss) cannot remove its temporary file; a command
    that writes such outputs calls this before it starts so they do not pile up. Not for a folder
    that another live process is writing the same kind of output into.
    """
    folder = Path(folder)
    pattern = f".*{glob.escape(target_suffix)}.*.tmp*"
    removed = 0
    for p in folder.rglob(pattern) if recursive else folder.glob(pattern):
        m = _TEMP_RE.match(p.name)
        ok = m is not None and (m["target"] == target_suffix if exact else m["target"].endswith(target_suffix))
        if ok and p.is_file() and not p.is_symlink():
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
    return removed


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success rename it onto `path` (replacing it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
