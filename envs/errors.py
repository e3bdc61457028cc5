"""How the project's commands report a named error: one line on stderr, exit status 2.

The project's errors name what is wrong (a ``ValueError`` such as ``DatasetError``, a missing file, a non-finite
loss); a traceback adds nothing for a user, so the commands (``lightning``, ``python -m envs.collect``, ``python -m
lightning_modules.evaluate``, the pipeline) print ``error: <message>`` and exit 2. Set ``REFLECTIVE_TRACEBACK=1``
to get the traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

TRACEBACK_ENV = "REFLECTIVE_TRACEBACK"
NAMED_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FloatingPointError, PermissionError,
                                                 IsADirectoryError, NotADirectoryError, InterruptedError)
EXIT_NAMED_ERROR = 2


def one_line(err: BaseException) -> str:
    """The error's message on one line (its whitespace and line breaks collapsed)."""
    return " ".join(str(err).split()) or type(err).__name__


def report(err: BaseException) -> int:
    """Print ``error: <message>`` to stderr; returns the exit status."""
    print(f"error: {one_line(err)}", file=sys.stderr)
    return EXIT_NAMED_ERROR


def run_command(main: Callable[[], int | None]) -> int:
    """Run a command's body; a named error becomes one line and exit status 2 (unless ``REFLECTIVE_TRACEBACK``)."""
    try:
        return int(main() or 0)
    except NAMED_ERRORS as err:
        if os.environ.get(TRACEBACK_ENV):
            raise
        return report(err)
