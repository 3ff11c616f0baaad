"""The errors a command can end with, and their exit codes (one table for every command).

``ConfigError`` (a bad config or argument) exits 2; ``TrainingError`` (the run cannot go on: bad
steps, an unloadable checkpoint, a locked run directory) and ``BadSampleError`` (bad data under
``on_bad_sample: error``) exit 1. ``run_command`` applies the table around a command's body.
"""
from __future__ import annotations

import sys
from typing import Callable

from imagebert_ds.config_utils import ConfigError


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. non-finite losses); the last complete checkpoint is intact."""


def _exit_codes():
    from imagebert_ds.data.shards import BadSampleError

    # (error class, exit code, prefix); the first match wins, so ConfigError (a ValueError)
    # precedes the plain ValueError of a bad argument
    return ((ConfigError, 2, "config error"), (TrainingError, 1, "training stopped"),
            (BadSampleError, 1, "data error"), (FileNotFoundError, 2, "error"),
            (ValueError, 2, "error"))


def run_command(body: Callable[[], object], prog: str, catch_value_errors: bool = False) -> int:
    """Run ``body()``; an expected error becomes one line on stderr and its exit code.

    ``catch_value_errors`` also maps a plain ``ValueError`` / ``FileNotFoundError`` (a bad
    argument of a command such as ``evaluate``) to exit code 2; elsewhere they are bugs and raise.
    """
    try:
        rc = body()
    except Exception as e:  # noqa: BLE001 - re-raised below unless it is in the table
        for cls, code, prefix in _exit_codes():
            if isinstance(e, cls):
                if cls in (FileNotFoundError, ValueError) and not catch_value_errors:
                    raise
                where = f"{prog}: {prefix}" if prefix == "error" else prefix
                print(f"{where}: {e}", file=sys.stderr)
                return code
        raise
    return rc if isinstance(rc, int) else 0
