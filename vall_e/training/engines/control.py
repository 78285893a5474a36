"""Steering a running training: stdin commands and SIGINT/SIGTERM.

Rank 0 reads stdin lines on a background thread (so the loop never blocks on input); once per
optimizer step the trainer polls, and under torchrun the lines are broadcast from rank 0 and the
stop flag is all-reduced, so every rank acts on the same command at the same step.

Commands (as in the reference): `save`, `quit`, `export`, `eval`, `lr X`, `time`, `help`.

Signals: the first SIGINT or SIGTERM asks the loop to save (when trainer.save_on_quit) and exit
cleanly with status 0 at the end of the current step. A second SIGINT, more than a second later,
aborts at once (the grace second absorbs the SIGTERM that torchrun sends right after a Ctrl-C).
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

HELP = ("commands: save | quit | export | eval | lr <value> | time | help  "
        "(quit saves first when trainer.save_on_quit)")


def parse_command(line: str) -> tuple[str, str] | None:
    """'lr 0.1' -> ('lr', '0.1'); blank -> None."""
    parts = line.strip().split(None, 1)
    if not parts:
        return None
    return parts[0].lower(), (parts[1].strip() if len(parts) > 1 else "")


class StdinReader:
    """Collects stdin lines on a daemon thread.

    It reads the raw file descriptor (`os.read`), never `sys.stdin`, so a thread blocked in a read
    holds no interpreter lock at exit. While the process sits in a background job of a terminal it
    does not read (a read would stop the whole job with SIGTTIN).
    """

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self.lines: "queue.Queue[str]" = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> "StdinReader":
        try:
            os.fstat(self.fd)
        except OSError:
            return self  # no stdin at all
        self._thread = threading.Thread(target=self._run, name="vall-e-stdin", daemon=True)
        self._thread.start()
        return self

    def _in_background(self) -> bool:
        try:
            return os.isatty(self.fd) and os.tcgetpgrp(self.fd) != os.getpgrp()
        except OSError:
            return False

    def _run(self) -> None:
        buf = b""
        while True:
            if self._in_background():
                time.sleep(1.0)
                continue
            try:
                chunk = os.read(self.fd, 4096)
            except InterruptedError:
                continue
            except OSError:
                return
            if not chunk:  # EOF: stdin closed (e.g. </dev/null)
                if buf.strip():
                    self.lines.put(buf.decode("utf-8", "replace"))
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.lines.put(line.decode("utf-8", "replace"))

    def poll(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.lines.get_nowait())
            except queue.Empty:
                return out


class SignalHandler:
    """Context manager turning SIGINT/SIGTERM into a stop request (see the module docstring)."""

    GRACE_S = 1.0

    def __init__(self) -> None:
        self.stop_requested = False
        self.signal_name = ""
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.stop_requested:
            if signum == signal.SIGINT and now - self._first_at > self.GRACE_S:
                raise KeyboardInterrupt
            return
        self.stop_requested, self.signal_name, self._first_at = True, name, now
        logger.warning("%s received: stopping after this step (a second Ctrl-C aborts without saving)", name)

    def __enter__(self) -> "SignalHandler":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


class Controller:
    """What the loop asks once per step: the commands typed since, and whether to stop."""

    def __init__(self, signals: SignalHandler, rank: int = 0, world_size: int = 1, read_stdin: bool = True,
                 device: torch.device | str = "cpu") -> None:
        self.signals = signals
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.reader = StdinReader().start() if (read_stdin and rank == 0) else None

    def agree(self, flag: bool) -> bool:
        """True on every rank when any rank says True (under torchrun); the flag itself otherwise.

        For decisions one rank makes alone (rank 0's clock says the time budget is spent): every
        rank must leave the loop at the same step, or the next collective hangs."""
        if self.world_size <= 1:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def agree_max(self, value: int) -> int:
        """The largest of every rank's `value` (the value itself without torchrun): a number one
        rank's clock decides (the time-driven schedule position) must be the same on every rank."""
        if self.world_size <= 1:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def poll(self) -> tuple[list[str], bool]:
        lines = self.reader.poll() if self.reader is not None else []
        stop = self.signals.stop_requested
        if self.world_size > 1:
            data = "\n".join(lines).encode("utf-8") if self.rank == 0 else b""
            head = torch.tensor([len(data), int(stop)], dtype=torch.long, device=self.device)
            dist.all_reduce(head, op=dist.ReduceOp.MAX)  # rank 0's length (others send 0); any rank's stop
            n, stop = int(head[0]), bool(head[1])
            if n:
                buf = (torch.tensor(list(data), dtype=torch.uint8, device=self.device) if self.rank == 0
                       else torch.empty(n, dtype=torch.uint8, device=self.device))
                dist.broadcast(buf, 0)
                lines = bytes(buf.cpu().tolist()).decode("utf-8").split("\n")
        return [l for l in lines if l.strip()], stop
