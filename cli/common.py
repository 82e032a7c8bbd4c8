"""What every command shares: the ``--json`` option, logging to stderr, and one-line errors."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from seftkit.errors import SeftkitError


def json_option(func: Callable) -> Callable:
    return click.option("--json", "json_path", type=click.Path(dir_okay=False),
                        help="Also write the machine-readable report to this file.")(func)


def device_option(func: Callable) -> Callable:
    return click.option("--device", default="auto", show_default=True,
                        help="auto (CUDA if present, else CPU), cpu or cuda[:N].")(func)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(message)s", force=True)
    for noisy in ("transformers", "accelerate", "torch", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit."""
    click.echo(f"seftkit: error: {message}", err=True)
    sys.exit(code)


def handle_errors(func: Callable) -> Callable:
    """User errors become one line on stderr with exit 2; Ctrl-C exits 130 quietly."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_logging()
        try:
            return func(*args, **kwargs)
        except SeftkitError as exc:
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, exc.exit_code)
        except KeyboardInterrupt:
            click.echo("seftkit: interrupted; nothing was written to the output", err=True)
            sys.exit(130)
        except MemoryError:
            fail("out of memory; try a smaller --batch-size, --seqlen or --nsamples")

    return wrapper


def write_report(json_path: str | None, report: Any) -> None:
    if json_path:
        from seftkit.io import write_json

        write_json(json_path, report)
