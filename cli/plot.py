"""``seftkit plot``: redraw a repair or verify JSON report as a PNG (needs matplotlib: ``seftkit[plot]``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from seftkit.cli.common import handle_errors
from seftkit.errors import SeftkitError


@click.command()
@click.argument("report", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="PNG to write [default: REPORT with .png].")
@handle_errors
def plot(report: str, out: str | None) -> None:
    """Draw REPORT (the --json of seftkit repair or verify) as a PNG: loss, learning rate and SEFT updates for
    a repair; per-layer sparsity against the target for a verify."""
    from seftkit.plot import plot_report, png_beside

    click.echo(f"wrote {plot_report(read_report(report), out or png_beside(report))}")


def read_report(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SeftkitError(f"report {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SeftkitError(f"report {path} is not a JSON file ({type(exc).__name__})") from None
