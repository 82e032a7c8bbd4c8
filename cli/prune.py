"""``seftkit prune``: parse options, prune, print a summary, write the report. The work is in seftkit.prune."""

from __future__ import annotations

import click

from seftkit.cli.common import device_option, handle_errors, json_option, show_progress, write_report
from seftkit.data import DEFAULT_TRAIN_TEXT
from seftkit.models import DTYPE_CHOICES
from seftkit.prune.registry import PRUNERS


@click.command()
@click.argument("model")
@click.option("--method", type=click.Choice(list(PRUNERS)), required=True,
              help="Pruning criterion: " + "; ".join(f"{s.name}: {s.summary}" for s in PRUNERS.values()) + ".")
@click.option("--sparsity", type=float, help="Fraction of zeros in [0, 1) (unstructured).")
@click.option("--nm", help="N:M pattern, e.g. 2:4 (N zeros in every M consecutive inputs).")
@click.option("--calib", default=DEFAULT_TRAIN_TEXT, show_default=True,
              help="Calibration text: a built-in (olmo:...), a text/JSONL file or an Arrow folder.")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration windows.")
@click.option("--seqlen", type=int, default=2048, show_default=True,
              help="Tokens per window (capped to the model's maximum positions).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for picking calibration windows.")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Calibration windows run through a block at once.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder [default: MODEL-METHOD-PATTERN].")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--include", help="Regex of weight names to prune (replaces the default: decoder-block linears).")
@click.option("--exclude", help="Regex of weight names to leave dense.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True,
              help="Weight dtype in memory and in the output (auto: the input's); statistics are fp32 anyway.")
@click.option("--low-memory", is_flag=True,
              help="Keep one decoder block in memory at a time, read from and written to safetensors "
                   "(same result; for models larger than memory).")
@device_option
@json_option
@handle_errors
def prune(model: str, method: str, sparsity: float | None, nm: str | None, calib: str, nsamples: int, seqlen: int,
          seed: int, batch_size: int, out: str | None, overwrite: bool, include: str | None, exclude: str | None,
          dtype: str, low_memory: bool, device: str, json_path: str | None) -> None:
    """Prune MODEL to --sparsity S or --nm N:M and save it as an HF folder.

    MODEL is an HF folder, a .gguf file (converted once into the cache), a hub id already in the local Hugging
    Face cache (never downloaded) or a built-in name.

    Runs as is under torchrun --nproc-per-node N: calibration windows are split across the processes.
    """
    from seftkit.distributed import world
    from seftkit.prune import prune_checkpoint
    from seftkit.sparsity.pattern import parse_pattern
    from seftkit.sparsity.targets import TargetRule

    pattern = parse_pattern(sparsity, nm)
    report = prune_checkpoint(model, method, pattern, out=out, calib=calib, nsamples=nsamples, seqlen=seqlen,
                              seed=seed, rule=TargetRule(include, exclude), device=device, overwrite=overwrite,
                              batch_size=batch_size, dtype=dtype, low_memory=low_memory,
                              progress=show_progress())
    if not world().is_main:  # under torchrun only rank 0 reports
        return
    click.echo(f"pruned {report.model} with {report.method} to {report.pattern}: "
               f"{len(report.tensors)} tensors at {report.overall_sparsity:.2%} zeros")
    if report.calibration:
        cal = report.calibration
        click.echo(f"calibration: {cal['nsamples']} x {cal['seqlen']} tokens of {cal['data']} (seed {cal['seed']})")
    click.echo(f"time {report.wall_time_s:.1f} s, peak RSS {report.peak_rss_mb:.0f} MiB, {report.dtype} "
               f"-> {report.out}")
    write_report(json_path, report)
