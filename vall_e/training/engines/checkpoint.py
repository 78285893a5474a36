"""Training checkpoints: `ckpt/{name}/{step}/` folders that are complete or absent, never half-written.

Layout of one checkpoint folder::

    model.safetensors   every model's weights, keys "{model name}.{parameter}"
    state.pt            optimizer, schedule, scaler, RNG states, sampler position, counters
                        (tensors, dicts, lists, strings and numbers only: `torch.load(weights_only=True)`)
    manifest.json       size and sha256 of every other file, written last

The folder is written under a temporary name and renamed into place (`atomic_dir`); only then is
`latest` rewritten (atomically) to name it. So a crash at any point leaves `latest` naming a
complete checkpoint. On load the manifest is checked first, so a truncated or edited file is a
one-line error naming the file rather than a silent resume from damaged state.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from vall_e.models.weights import load_safetensors, save_safetensors
from vall_e.utils.errors import UserError
from vall_e.utils.io import atomic_dir, atomic_write_text

logger = logging.getLogger(__name__)

FORMAT = "vall-e-checkpoint"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"

_STEP_RE = re.compile(r"^\d+$")
_STALE_RE = re.compile(r"^\.(\d+|latest)\..*\.tmp$|^\.\d+\.old$|^\.model\.safetensors\..*\.tmp\.safetensors$")


# --------------------------------------------------------------------------------------------
# RNG states (as plain tensors and numbers, so weights_only loading works)
# --------------------------------------------------------------------------------------------

def get_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), int(npst["pos"]),
                         int(npst["has_gauss"]), float(npst["gauss"])))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("checkpoint has CUDA RNG states for %d devices, this machine has %d: not restored",
                           len(cuda), torch.cuda.device_count())


# --------------------------------------------------------------------------------------------
# Folders, latest, manifest
# --------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_plain(obj: Any, where: str = "state") -> None:
    """Refuse anything `torch.load(weights_only=True)` could not read back."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is not a str or int")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not (obj is None or isinstance(obj, (Tensor, bool, int, float, str, torch.dtype, torch.device))):
        raise TypeError(f"{where}: {type(obj).__name__} cannot be stored in a checkpoint")


def step_dirs(run_dir: Path) -> list[int]:
    """Steps of the checkpoint folders present (complete or not), ascending."""
    if not run_dir.is_dir():
        return []
    return sorted(int(p.name) for p in run_dir.iterdir() if p.is_dir() and _STEP_RE.match(p.name))


def is_complete(step_dir: Path) -> bool:
    return (step_dir / MANIFEST_FILE).is_file()


def read_latest(run_dir: Path) -> int | None:
    path = run_dir / LATEST_FILE
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if not _STEP_RE.match(text):
        raise UserError(f"{path}: expected a step number, got {text[:40]!r}")
    return int(text)


def remove_stale(run_dir: Path) -> None:
    """Temporary folders and files left by a process killed mid-save."""
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if _STALE_RE.match(p.name):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def prune(run_dir: Path, keep_last: int) -> list[int]:
    """Delete all but the newest `keep_last` checkpoint folders (by step); never the one `latest` names."""
    if keep_last <= 0:
        return []
    latest = read_latest(run_dir)
    steps = step_dirs(run_dir)
    keep = set(steps[-keep_last:]) | ({latest} if latest is not None else set())
    removed = [s for s in steps if s not in keep]
    for s in removed:
        # the manifest goes first, so a prune killed halfway leaves a folder marked incomplete
        (run_dir / str(s) / MANIFEST_FILE).unlink(missing_ok=True)
        shutil.rmtree(run_dir / str(s), ignore_errors=True)
    return removed


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, Tensor], state: dict[str, Any],
                    keep_last: int = 0, write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write `run_dir/{step}/` atomically, point `latest` at it, prune. Returns the folder.

    `write_extra(tmp_dir)` may add files (a DeepSpeed engine's shards) before the manifest is made.
    """
    _check_plain(state)
    run_dir = Path(run_dir)
    remove_stale(run_dir)
    final = run_dir / str(int(step))
    with atomic_dir(final) as tmp:
        save_safetensors(tmp / WEIGHTS_FILE, weights, {"format": FORMAT, "version": str(VERSION)})
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp / STATE_FILE)
        if write_extra is not None:
            write_extra(tmp)
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                files[p.relative_to(tmp).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
        manifest = {"format": FORMAT, "version": VERSION, "step": int(step), "files": files}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    atomic_write_text(run_dir / LATEST_FILE, f"{int(step)}\n")
    removed = prune(run_dir, keep_last)
    if removed:
        logger.info("removed old checkpoints: %s", ", ".join(map(str, removed)))
    return final


def verify_checkpoint(step_dir: Path) -> dict[str, Any]:
    """Check every file against the manifest; returns the manifest. UserError names the bad file."""
    mpath = step_dir / MANIFEST_FILE
    if not step_dir.is_dir():
        raise UserError(f"{step_dir}: checkpoint folder not found")
    if not mpath.is_file():
        raise UserError(f"{mpath}: missing, so {step_dir} is not a complete checkpoint")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError("not a vall-e checkpoint manifest")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{mpath}: damaged checkpoint manifest ({e})") from None
    version = manifest.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise UserError(f"{mpath}: damaged checkpoint manifest (version {version!r})")
    if version > VERSION:
        raise UserError(f"{mpath}: checkpoint format version {manifest.get('version')} is newer than this "
                        f"vall-e understands ({VERSION})")
    for rel, info in files.items():
        parts = Path(str(rel)).parts
        if not parts or Path(str(rel)).is_absolute() or ".." in parts:
            raise UserError(f"{mpath}: damaged checkpoint manifest (names {str(rel)[:80]!r}, outside the checkpoint)")
        if not isinstance(info, dict) or isinstance(info.get("size"), bool) or not isinstance(info.get("size"), int) \
                or not isinstance(info.get("sha256"), str):
            raise UserError(f"{mpath}: damaged checkpoint manifest (bad entry for {str(rel)[:80]!r})")
        p = step_dir / rel
        if not p.is_file():
            raise UserError(f"{p}: missing from checkpoint {step_dir}")
        size = p.stat().st_size
        if size != info["size"]:
            raise UserError(f"{p}: {size} bytes, the manifest says {info['size']} (truncated or damaged)")
        if _sha256(p) != info["sha256"]:
            raise UserError(f"{p}: contents do not match the checkpoint manifest (damaged or edited)")
    return manifest


def load_checkpoint(step_dir: Path, map_location: str | torch.device = "cpu",
                    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(flat weights, state) of a verified checkpoint folder."""
    step_dir = Path(step_dir)
    verify_checkpoint(step_dir)
    weights, _ = load_safetensors(step_dir / WEIGHTS_FILE)
    spath = step_dir / STATE_FILE
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(spath, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # anything beyond plain data: a pickle that could run code
        reason = next((ln.strip()[:160] for ln in str(e).splitlines()
                       if ln.strip().startswith(("Trying to load unsupported", "Unsupported"))), "not plain data")
        raise UserError(f"{spath}: refused to load: it holds Python objects other than plain data, which could "
                        f"run code ({reason})") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{spath}: cannot be loaded, it is truncated or damaged ({first[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{spath}: not a vall-e training state")
    for key in ("step", "samples", "tokens", "skipped_nan", "skipped_oom", "elapsed"):
        v = state.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, (float if key == "elapsed" else int, int)) or not v >= 0:
            raise UserError(f"{spath}: damaged training state ({key!r} is {v!r})")
    return weights, state


def find_checkpoint(run_dir: Path, tag: str = "") -> Path | None:
    """The folder to resume from: `tag`, else the one `latest` names; None when there is none.

    When `latest` names a folder that does not exist (removed by hand, or a crash while an older
    copy of the same step was being replaced), the newest complete earlier checkpoint is used and
    a log line says so. A folder that exists but is damaged is an error, never skipped.
    """
    run_dir = Path(run_dir)
    if tag:
        d = run_dir / str(tag)
        if not d.is_dir():
            raise UserError(f"trainer.load_tag={tag}: no checkpoint folder {d}")
        return d
    latest = read_latest(run_dir)
    if latest is None:
        return None
    d = run_dir / str(latest)
    if d.is_dir():
        return d
    earlier = [s for s in step_dirs(run_dir) if s < latest and is_complete(run_dir / str(s))]
    if not earlier:
        raise UserError(f"{run_dir / LATEST_FILE}: names step {latest}, but {d} is missing and there is no "
                        "earlier complete checkpoint; remove the file to start from scratch")
    logger.warning("%s names step %d, but %s is missing: resuming from the previous complete checkpoint, "
                   "step %d", run_dir / LATEST_FILE, latest, d, earlier[-1])
    return run_dir / str(earlier[-1])
