"""Errors a user can fix, and how every entry point (`trl-gae`, the example scripts) reports them: one line.

`CLIError` lives here rather than in `cli.py` so that the modules raising it (`cli_args`, `data`, `demo`) do not
import the command line, which imports them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class CLIError(Exception):
    """An error the user can fix: printed as one line, `message; fix: fix`, without a traceback."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message, self.fix = message, fix


def debug_requested() -> bool:
    """`TRL_GAE_DEBUG=1` asks for tracebacks (the `trl-gae` command also takes a bare `--debug`)."""
    return os.environ.get("TRL_GAE_DEBUG", "") not in ("", "0")


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def format_error(prog: str, err: BaseException) -> str:
    """One line: `prog: error: <what is wrong>; fix: <what to do>`."""
    if isinstance(err, CLIError):
        message = _one_line(err.message).rstrip(".")
        return f"{prog}: error: {message}" + (f"; fix: {_one_line(err.fix)}" if err.fix else "")
    reason = _one_line(err) or type(err).__name__
    return f"{prog}: error: {type(err).__name__}: {reason}; fix: rerun with --debug (or TRL_GAE_DEBUG=1) for the traceback"


def run_main(main: Callable[[], object], prog: str | None = None, debug: bool | None = None) -> int:
    """Run `main()` as a command: the exit code (0 ok, 1 failure, 2 a `CLIError`, 130 interrupted), errors printed
    as one line on stderr. With `debug` (default: `TRL_GAE_DEBUG`), exceptions propagate with their traceback."""
    prog = prog or os.path.basename(sys.argv[0])
    debug = debug_requested() if debug is None else debug
    try:
        result = main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        print(format_error(prog, err), file=sys.stderr)
        return 2 if isinstance(err, CLIError) else 1
    return result if isinstance(result, int) else 0
