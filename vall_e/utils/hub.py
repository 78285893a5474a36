"""The Hugging Face hub with one-line errors: one file through huggingface_hub's cache (`hub_file`),
and a transformers model from a hub id or a `save_pretrained` folder (`load_pretrained`).

A cached file is used without touching the network. Otherwise it is downloaded; huggingface_hub's
own retry warnings are kept off the terminal, and a failure (offline and not cached, no such
repository or file) becomes one `UserError` line."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from vall_e.utils.errors import UserError

T = TypeVar("T")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' weight-loading progress bars and info logs while a model loads."""
    from transformers.utils import logging as tlog

    bar = tlog.is_progress_bar_enabled()
    verbosity = tlog.get_verbosity()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        if bar:
            tlog.enable_progress_bar()
        tlog.set_verbosity(verbosity)


def looks_like_path(s: str) -> bool:
    """A name meant as a folder (so a missing one is an error), not a hub id such as `owner/name`."""
    return s.startswith(("/", ".", "~")) or "\\" in s or s.count("/") > 1 or os.sep != "/" and os.sep in s


def load_pretrained(name: str, what: str, label: str, classes: Sequence[str], use: str,
                    load: Callable[[str], T]) -> T:
    """`load(source)` for a hub id or a local folder written by the `classes`' `save_pretrained`, with
    transformers kept quiet; a file, a folder without config.json, a missing folder, or a model that
    cannot be loaded or downloaded is one `UserError` line starting with `what` (`use`: how the
    command takes the folder instead, e.g. `codec.model=DIR`)."""
    writer = " and ".join(f"{c}.save_pretrained" for c in classes)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{what}: {path} is a file; pass the folder that holds config.json (written by {writer})")
        if not (path / "config.json").is_file():
            raise UserError(f"{what}: {path} has no config.json; expected a folder written by {writer}")
        source = str(path)
    elif looks_like_path(name):
        raise UserError(f"{what}: no such folder {name}")
    else:
        source = name
    try:
        with quiet_transformers():
            return load(source)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"{what}: could not load {label} {name!r} ({first}). It is neither a local folder nor downloadable "
            "from the Hugging Face hub here; on a machine with network run "
            + " and ".join(f"`{c}.from_pretrained({name!r}).save_pretrained(DIR)`" for c in classes)
            + f", then pass {use}") from None


def check_model_type(model: Any, expected: str, what: str, name: str, label: str) -> None:
    kind = getattr(model.config, "model_type", "")
    if kind != expected:
        raise UserError(f"{what}: {name!r} is a {kind!r} model, not {label}")


def hub_file(repo: str, filename: str, what: str, hint: str = "") -> Path:
    """The local path of `filename` in hub repository `repo`; `what` names it in errors, `hint` ends them."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise UserError(f"{what}: downloading from the Hugging Face hub needs huggingface_hub "
                        "(pip install huggingface_hub)" + (f"; {hint}" if hint else "")) from None
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, local_files_only=True))
    except Exception:  # not cached (or the cache is unreadable): download it
        pass
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # "'...' thrown while requesting HEAD ...", "Retrying in 2s ..."
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as e:
        name = type(e).__name__
        if name in ("RepositoryNotFoundError", "GatedRepoError"):
            why = f"the hub has no repository {repo} that can be read without logging in"
        elif name in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
            why = f"the repository {repo} has no file {filename}"
        elif name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "connect" in str(e).lower():
            why = (f"cannot download {repo}/{filename} (no connection to the Hugging Face hub?) "
                   "and it is not in huggingface_hub's cache")
        else:
            first = (str(e).strip().splitlines() or [""])[0]
            why = f"cannot download {repo}/{filename}: {name}" + (f": {first[:120]}" if first else "")
        raise UserError(f"{what}: {why}" + (f"; {hint}" if hint else "")) from None
    finally:
        hub_logger.setLevel(level)
