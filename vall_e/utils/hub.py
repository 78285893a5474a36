"""One file from the Hugging Face hub, through huggingface_hub's cache, with a one-line error.

A cached file is used without touching the network. Otherwise it is downloaded; huggingface_hub's
own retry warnings are kept off the terminal, and a failure (offline and not cached, no such
repository or file) becomes one `UserError` line."""
from __future__ import annotations

import logging
from pathlib import Path

from vall_e.utils.errors import UserError


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
