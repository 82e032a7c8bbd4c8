"""``seftkit export``: write a sparse model in a format other tools read, proven by reading it back."""

from __future__ import annotations

import click

from seftkit.cli.common import handle_errors, json_option, show_progress, write_report
from seftkit.exporters.registry import FORMATS


@click.command(help="Export MODEL (HF folder or built-in name) to --out in a format other tools read.\n\n"
               + "\n\n".join(f"{f.name}: {f.description}." for f in FORMATS.values()))
@click.argument("model")
@click.option("--format", "fmt", required=True, metavar="|".join(FORMATS), help="Export format (see above).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (written atomically).")
@click.option("--dtype", default="auto", show_default=True,
              help="auto (as the checkpoint stores it), fp32, bf16 or fp16. ONNX is fp32 only.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the torch exporter's).")
@click.option("--sparse-initializers", is_flag=True,
              help="ONNX: store weights above 2/3 sparsity as sparse initializers (smaller file; ORT densifies).")
@click.option("--nm-layout", is_flag=True,
              help="CSR: store 2:4 weights as 2 values + 2-bit positions per group of 4 instead of CSR.")
@click.option("--include", default=None, help="Regex of weight names to store sparse (replaces the default rule).")
@click.option("--exclude", default=None, help="Regex of weight names to keep dense.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@json_option
@handle_errors
def export(model: str, fmt: str, out: str, dtype: str, opset: int | None, sparse_initializers: bool,
           nm_layout: bool, include: str | None, exclude: str | None, overwrite: bool, json_path: str | None) -> None:
    from seftkit.exporters import ExportOptions, export_model
    from seftkit.sparsity.targets import TargetRule

    options = ExportOptions(opset=opset, sparse_initializers=sparse_initializers, nm_layout=nm_layout)
    report = export_model(model, fmt, out, dtype=dtype, options=options, overwrite=overwrite,
                          rule=TargetRule(include, exclude), progress=show_progress())
    click.echo(f"exported {model} as {report.layout} ({report.dtype}) to {report.out}")
    click.echo(f"  {report.targets} sparse weights at {report.sparsity:.1%} zeros; weights "
               f"{report.export_bytes / 1e6:.1f} MB vs {report.dense_bytes / 1e6:.1f} MB dense "
               f"({report.size_ratio:.3f}x)")
    click.echo(f"  export {report.export_seconds:.2f} s, load {report.load_seconds:.2f} s; "
               f"read back: {_parity(report.parity)}")
    for note in report.notes:
        click.echo(f"  note: {note}")
    write_report(json_path, report)


def _parity(parity: dict) -> str:
    return ", ".join(f"{key} {value:.3g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in parity.items())
