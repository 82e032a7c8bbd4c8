"""``seftkit verify``: exit 0 when every targeted weight meets the bar, 1 when one falls short, 2 for bad input.

Torch-free on purpose (CI installs it light): only numpy, click and tqdm are imported.
"""

from __future__ import annotations

import sys

import click

from seftkit.cli.common import handle_errors, json_option, show_progress, write_report
from seftkit.plot import check_plot_path, plot_report
from seftkit.sparsity.pattern import parse_pattern
from seftkit.sparsity.targets import TargetRule
from seftkit.verify import DEFAULT_TOL, VerifyReport, verify_model

# How many failing tensors the summary lists (the JSON report always has them all).
_MAX_LISTED = 20


@click.command()
@click.argument("model")
@click.option("--sparsity", type=float, help="Every targeted weight needs at least this fraction of zeros.")
@click.option("--tol", type=float, default=DEFAULT_TOL, show_default=True,
              help="Accept a fraction of zeros down to SPARSITY - TOL.")
@click.option("--nm", help="N:M pattern (e.g. 2:4): at least N zeros in every M consecutive inputs of a row.")
@click.option("--include", help="Regex: check the 2-D weights whose name matches (replaces the default rule).")
@click.option("--exclude", help="Regex: skip weights whose name matches.")
@click.option("--per-layer", is_flag=True, help="Print a sparsity table per decoder layer.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Draw per-layer sparsity against the target to this PNG (needs matplotlib).")
@json_option
@handle_errors
def verify(model: str, sparsity: float | None, tol: float, nm: str | None, include: str | None,
           exclude: str | None, per_layer: bool, plot_path: str | None, json_path: str | None) -> None:
    """Prove MODEL (folder, .safetensors file or built-in name) is sparse, reading safetensors directly."""
    if plot_path:
        check_plot_path(plot_path)
    pattern = parse_pattern(sparsity, nm) if sparsity is not None or nm is not None else None
    report = verify_model(model, pattern, tol, TargetRule(include, exclude), progress=show_progress())
    click.echo(format_summary(report, per_layer))
    write_report(json_path, report.to_dict())
    if plot_path:
        click.echo(f"wrote {plot_report(report.to_dict(), plot_path)}")
    if not report.passed:
        sys.exit(1)


def format_summary(report: VerifyReport, per_layer: bool = False) -> str:
    """The human summary: what was checked, global sparsity, optional layer table, verdict and failures."""
    th = report.thresholds
    lines = [
        f"model: {report.model} ({report.model_type or 'unknown type'}, {len(report.files)} file(s), "
        f"{len(report.tensors)} targeted weights)",
        f"global sparsity: {report.overall.sparsity:.2%} ({report.overall.zeros:,} of "
        f"{report.overall.numel:,} weights are zero)",
    ]
    if per_layer:
        lines.append(f"{'layer':>5}  {'weights':>12}  {'zeros':>12}  sparsity")
        lines += [f"{i:>5}  {t.numel:>12,}  {t.zeros:>12,}  {t.sparsity:.2%}" for i, t in report.per_layer.items()]
    if th.nm is not None:
        bar = f"N:M {th.nm}"
    elif th.sparsity is not None:
        bar = f"sparsity >= {th.sparsity:g} - {th.tol:g} in every weight"
    else:
        lines.append("no --sparsity or --nm given: measured only")
        return "\n".join(lines)
    failures = report.failures
    if not failures:
        lines.append(f"PASS: all {len(report.tensors)} weights meet {bar}")
        return "\n".join(lines)
    lines.append(f"FAIL: {len(failures)} of {len(report.tensors)} weights do not meet {bar}")
    for t in failures[:_MAX_LISTED]:
        if t.first_violation is not None:
            detail = (f"{t.nm_violations:,} groups short; first at row {t.first_violation.row}, "
                      f"column {t.first_violation.column}")
        else:
            detail = f"sparsity {t.sparsity:.2%}, below the {t.sparsity + t.shortfall:.2%} required"
        lines.append(f"  {t.name}: {detail}")
    if len(failures) > _MAX_LISTED:
        lines.append(f"  ... and {len(failures) - _MAX_LISTED} more (see --json)")
    return "\n".join(lines)
