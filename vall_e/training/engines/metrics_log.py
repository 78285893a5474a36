"""Training metrics: one JSON line per step, TensorBoard when installed, and a tqdm bar.

`metrics.jsonl` is an append-only log. After a crash it may hold lines for steps past the
checkpoint that training resumes from (and possibly one cut-off line); `truncate_after` rewrites it
(atomically) to end at the resumed step, so no step is ever recorded twice.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Iterator

from tqdm import tqdm

from vall_e.utils.io import atomic_write_text

logger = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become strings rather than invalid JSON tokens."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def iter_metrics(path: Path) -> Iterator[dict[str, Any]]:
    """Every well-formed record of a metrics.jsonl (a cut-off last line is skipped)."""
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


class MetricsWriter:
    """Appends records to `path` (rank 0 only; other ranks get `enabled=False`)."""

    def __init__(self, path: Path, enabled: bool = True, tensorboard_dir: Path | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._file = None
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard_dir is not None:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(tensorboard_dir))
                except (ImportError, ModuleNotFoundError):
                    logger.info("tensorboard is not installed: metrics go to %s only", self.path)

    def truncate_after(self, step: int) -> int:
        """Keep only complete records with `step` <= step; returns how many were dropped."""
        if not self.enabled or not self.path.exists():
            return 0
        self.close_file()
        raw = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        keep, dropped = [], 0
        for line in raw:
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and int(rec.get("step", 0)) <= step
            except (ValueError, TypeError):
                ok = False
            if ok:
                keep.append(line)
            elif line.strip():
                dropped += 1
        if dropped:
            atomic_write_text(self.path, "".join(l + "\n" for l in keep))
            logger.info("%s: dropped %d record(s) past the resumed step %d", self.path, dropped, step)
        return dropped

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(_clean(record), ensure_ascii=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        self.close_file()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class ProgressBar:
    """A tqdm bar over optimizer steps with loss and lr in its postfix (rank 0 only)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True) -> None:
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                        disable=not enabled, file=sys.stderr, mininterval=0.5)

    def update(self, step: int, loss: float | None = None, lr: float | None = None) -> None:
        post = {}
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        if lr is not None:
            post["lr"] = f"{lr:.3g}"
        self.bar.set_postfix(post, refresh=False)
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)  # redraws at most every mininterval

    def write(self, msg: str) -> None:
        self.bar.write(msg, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
