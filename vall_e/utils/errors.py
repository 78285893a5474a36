"""One error type for bad user input, and the wrapper that turns it into a one-line message.

Commands raise `UserError` for anything the user can fix (a bad file, key or value). `run_main`
prints it as `error: ...` on one line and exits non-zero, so no traceback from deep inside torch
ever reaches the user for bad input.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence


class UserError(Exception):
    """A problem with the user's input, reported as one line naming the file or key."""


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a command's `main`, mapping `UserError` to a one-line message and exit code 2."""
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except BrokenPipeError:  # e.g. piped into `head`
        raise SystemExit(0) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(code or 0)
