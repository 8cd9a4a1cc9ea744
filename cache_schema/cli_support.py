"""What every console command shares: one-line errors and non-zero exits instead of tracebacks."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

import click
import typer

from cache_schema.errors import RoicacheError
from cache_schema.object_store import object_store_error

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
        except (click.exceptions.Exit, click.exceptions.Abort, click.exceptions.ClickException):
            raise  # the command's own exits and typer's usage errors
        except Exception as e:
            # Object storage failing after the store was opened (credentials expired, access
            # revoked, endpoint gone): botocore/s3fs errors, which may also be OSErrors below.
            problem = object_store_error(None, e)
            if problem is None:
                _plain_os_error(e)
            fail(str(problem))
        except KeyboardInterrupt:
            fail("interrupted; outputs written so far are kept and marked incomplete — rerun the "
                 "same command (with --resume where it has one) to continue", EXIT_INTERRUPTED)

    return wrapper  # type: ignore[return-value]


def _plain_os_error(e: Exception) -> None:
    """One line for a missing, existing or forbidden file; re-raises anything else (a bug)."""
    if isinstance(e, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        fail(f"{e.strerror or type(e).__name__}: {e.filename or ''} — check the path and its permissions")
    raise e
