"""What every command shares: the ``--json`` option, output options, logging to stderr and the exit codes.

Exit codes: 0 ok, 1 a check failed (only ``verify`` uses it), 2 bad input (:class:`SeftkitError`, usage
errors, a missing third-party package), 3 internal error (a bug: one line, the traceback with ``--debug`` or
``SEFTKIT_DEBUG=1``), 130 interrupted.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import click

from seftkit.errors import SeftkitError, first_line

EXIT_SHORT, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 130
DEBUG_ENV = "SEFTKIT_DEBUG"
# ctx.meta key (meta is shared by a command's context and its group's): the command's progress choice.
_PROGRESS = "seftkit.progress"


def json_option(func: Callable) -> Callable:
    return click.option("--json", "json_path", type=click.Path(dir_okay=False),
                        help="Also write the machine-readable report to this file.")(func)


def device_option(func: Callable) -> Callable:
    return click.option("--device", default="auto", show_default=True,
                        help="auto (CUDA if present, else CPU), cpu or cuda[:N].")(func)


def output_options(func: Callable) -> Callable:
    """``-q/--quiet``, ``-v/--verbose`` and ``--progress/--no-progress``, consumed by :func:`handle_errors`."""
    func = click.option("--progress/--no-progress", default=None,
                        help="Show progress bars on stderr [default: only when stderr is a terminal and not -q].")(func)
    func = click.option("-v", "--verbose", is_flag=True, help="Debug logging on stderr.")(func)
    return click.option("-q", "--quiet", is_flag=True,
                        help="Only results on stdout; warnings and errors on stderr.")(func)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, stream=sys.stderr, format="%(message)s", force=True)
    for noisy in ("transformers", "accelerate", "torch", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def show_progress() -> bool:
    """Whether the running command draws progress bars (pass it to the API's ``progress=``)."""
    ctx = click.get_current_context(silent=True)
    choice = ctx.meta.get(_PROGRESS) if ctx is not None else None
    return _stderr_is_terminal() if choice is None else choice


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def debug_enabled() -> bool:
    """``--debug`` on the group or ``SEFTKIT_DEBUG`` set to anything but empty/0: internal errors show tracebacks."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.find_root().params.get("debug"):
        return True
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Print one line on stderr and exit."""
    click.echo(f"seftkit: error: {message}", err=True)
    sys.exit(code)


@contextlib.contextmanager
def exit_codes(what: str) -> Iterator[None]:
    """Turn whatever escapes ``what`` (a command name) into the exit-code contract above.

    click's own exceptions (usage errors, ``--help``) and ``sys.exit`` pass through unchanged.
    """
    try:
        yield
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except SeftkitError as exc:
        fail(first_line(exc), exc.exit_code)
    except KeyboardInterrupt:
        click.echo("seftkit: interrupted; no output folder was written (a repair's <out>.ckpt is kept for --resume)",
                   err=True)
        sys.exit(EXIT_INTERRUPTED)
    except MemoryError:
        fail("out of memory; try a smaller --batch-size, --seqlen or --nsamples")
    except ModuleNotFoundError as exc:
        package = (exc.name or "").split(".")[0]
        if package and package != "seftkit":  # seftkit's own module missing is a broken install: internal
            fail(f"{what} needs the Python package {package}, which is not installed (the light install of "
                 "seftkit runs only verify; install seftkit with its dependencies)")
        _internal_error(what, exc)
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch's CUDA OOM is a RuntimeError, not a MemoryError
            fail("out of device memory; try a smaller --batch-size, --seqlen or --nsamples")
        _internal_error(what, exc)


def _internal_error(what: str, exc: Exception) -> None:
    """One line and exit 3; the traceback first when debugging (call it while ``exc`` is being handled)."""
    if debug_enabled():
        traceback.print_exc(file=sys.stderr)
        hint = "the traceback is above"
    else:
        hint = f"rerun with --debug or {DEBUG_ENV}=1 for the traceback"
    click.echo(f"seftkit: internal error in {what}: {type(exc).__name__}: {first_line(exc)} ({hint})", err=True)
    sys.exit(EXIT_INTERNAL)


def handle_errors(func: Callable) -> Callable:
    """The wrapper every command wears: its output options (see :func:`output_options`), logging on stderr at
    the level they ask for, and the exit codes of :func:`exit_codes`."""

    @functools.wraps(func)
    def wrapper(*args: Any, quiet: bool, verbose: bool, progress: bool | None, **kwargs: Any) -> Any:
        setup_logging(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
        ctx = click.get_current_context()
        ctx.meta[_PROGRESS] = False if quiet and progress is None else progress
        with exit_codes(ctx.info_name or func.__name__):
            return func(*args, **kwargs)

    return output_options(wrapper)


def write_report(json_path: str | None, report: Any) -> None:
    if json_path:
        from seftkit.io import write_json

        write_json(json_path, report)
