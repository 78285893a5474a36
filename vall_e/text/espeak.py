"""Find and load the espeak-ng library, so that `pip install` is the whole setup.

The library and its data come from the `espeakng-loader` wheel; a system espeak-ng
(`libespeak-ng.so`, found by `ctypes.util.find_library`) is the fallback when the wheel is missing.

espeak-ng keeps its state in globals, so two users in one process must not share one loaded copy.
phonemizer already loads a private temporary copy of the library for each backend; speech synthesis
(`vall_e.data.synthetic`) loads another copy of its own (`load_private_library`), so both can run in
one process without changing each other's voice or settings. Because nobody else opens that copy,
`unload_library` really unloads it, and the next load starts from clean globals.
"""
from __future__ import annotations

import _ctypes
import atexit
import ctypes
import ctypes.util
import functools
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from vall_e.utils.errors import UserError

_INSTALL_HINT = "install the espeakng-loader wheel (pip install espeakng-loader) or a system espeak-ng"
_configure_lock = threading.Lock()
_configured = False


@functools.lru_cache(maxsize=1)
def library_path() -> str:
    """Path of the espeak-ng shared library: the wheel's, else the system's."""
    try:
        import espeakng_loader

        path = espeakng_loader.get_library_path()
        if Path(path).is_file():
            return str(path)
    except Exception:  # the wheel is missing or broken: fall back to the system library
        pass
    for name in ("espeak-ng", "espeak"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    raise UserError(f"espeak-ng library not found: {_INSTALL_HINT}")


@functools.lru_cache(maxsize=1)
def data_path() -> str | None:
    """espeak-ng data folder of the wheel, or None to let a system library use its built-in path."""
    try:
        import espeakng_loader

        if Path(espeakng_loader.get_library_path()).is_file():
            return str(espeakng_loader.get_data_path())
    except Exception:
        pass
    return os.environ.get("ESPEAK_DATA_PATH") or None


def configure_phonemizer() -> None:
    """Point phonemizer's espeak backend at our library and data (idempotent, thread-safe)."""
    global _configured
    with _configure_lock:
        if _configured:
            return
        try:
            from phonemizer.backend.espeak.wrapper import EspeakWrapper
        except ImportError as e:
            raise UserError(f"phonemizer is not installed ({e}): pip install phonemizer") from None
        lib, data = library_path(), data_path()
        EspeakWrapper.set_library(lib)
        if data is not None:
            os.environ.setdefault("ESPEAK_DATA_PATH", data)
            if hasattr(EspeakWrapper, "set_data_path"):
                EspeakWrapper.set_data_path(data)
        _configured = True


def _resolve(path: str) -> Path:
    """Absolute file of a library given by path or by a bare name like 'libespeak-ng.so.1'."""
    p = Path(path)
    if p.is_file():
        return p.resolve()
    lib = ctypes.CDLL(path)  # a bare name: let the loader find it, then ask where it came from
    try:
        import dlinfo  # installed with phonemizer on Linux/macOS

        return Path(dlinfo.DLInfo(lib).path).resolve()
    except Exception:
        raise UserError(f"cannot locate the file of espeak library {path!r}: {_INSTALL_HINT}") from None


@functools.lru_cache(maxsize=1)
def private_library_copy() -> Path:
    """A copy of the espeak-ng library in a temporary folder of our own (removed at exit).

    dlopen returns the already-loaded handle for a path, so a copy is the only way to get globals of
    our own; nobody else opens this path, so closing it really unloads it.
    """
    src = _resolve(library_path())
    tmp = tempfile.mkdtemp(prefix="vall_e_espeak_")
    atexit.register(shutil.rmtree, tmp, True)
    dst = Path(tmp) / src.name
    try:
        shutil.copy(src, dst)
    except OSError as e:
        raise UserError(f"cannot copy espeak library {src} to {tmp}: {e}") from None
    return dst


def load_private_library() -> ctypes.CDLL:
    """Load the private copy of the espeak-ng library (its globals are not shared with phonemizer)."""
    path = private_library_copy()
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise UserError(f"failed to load espeak library {path}: {e}") from None


def unload_library(lib: ctypes.CDLL) -> None:
    """dlclose a library loaded by `load_private_library`, so the next load starts from clean globals.

    The caller must drop every reference to `lib` (and its functions) afterwards.
    """
    if sys.platform == "win32":  # pragma: no cover
        _ctypes.FreeLibrary(lib._handle)
    else:
        _ctypes.dlclose(lib._handle)
