"""What every console command shares: one-line errors and non-zero exits instead of tracebacks."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import typer

from cache_schema.errors import RoicacheError

F = TypeVar("F", bound=Callable)

#: Exit status of a command that failed because of its input (2, as argparse/click use).
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Print ``error: message`` on one line of stderr and exit with ``code``."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise typer.Exit(code)


def friendly_errors(fn: F) -> F:
    """Decorate a typer command so that user-caused errors become one line and exit 2.

    Why here and not in ``main``: typer's ``CliRunner`` (the tests) calls the command object, not
    ``main``, and must see the same behaviour as a user.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RoicacheError as e:
            fail(str(e))
        except (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            target = e.filename or ""
            fail(f"{e.strerror or type(e).__name__}: {target} — check the path and its permissions")
        except KeyboardInterrupt:
            fail("interrupted; outputs written so far are kept and marked incomplete — rerun the "
                 "same command (with --resume where it has one) to continue", EXIT_INTERRUPTED)

    return wrapper  # type: ignore[return-value]
