"""``seftkit eval``: parse options, evaluate, print the table, write the report. The work is in seftkit.eval."""

from __future__ import annotations

import click

from seftkit.cli.common import device_option, handle_errors, json_option, show_progress, write_report
from seftkit.data import DEFAULT_HELDOUT_TEXT, TASK_MIXES
from seftkit.eval.tasks import DEFAULT_TASKS, TASKS


@click.command()
@click.argument("model")
@click.option("--ppl", "ppl_data", help=f"Perplexity data: a built-in (olmo:...), a text/JSONL file or an Arrow "
              f"folder [default: {DEFAULT_HELDOUT_TEXT} when --tasks is not given].")
@click.option("--seqlen", type=int, default=512, show_default=True,
              help="Perplexity window length (capped to the model's maximum positions).")
@click.option("--tasks", help=f"Multiple-choice tasks, comma- or +-separated, e.g. {','.join(DEFAULT_TASKS[:3])}; "
              f"choose from: {', '.join(TASKS)}; or a mix: {', '.join(TASK_MIXES)}.")
@click.option("--split", type=click.Choice(["train", "heldout", "fit", "val"]),
              help="Score only one part of each task: heldout (what repair never trains on), train, or train's "
                   "val / fit parts [default: all validation questions].")
@click.option("--limit", type=int, help="At most this many questions per task (the first ones), for quick looks.")
@click.option("--batch-size", type=int, default=4, show_default=True,
              help="Perplexity windows or questions per forward pass.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Weight dtype to evaluate in.")
@device_option
@json_option
@handle_errors
def eval(model: str, ppl_data: str | None, seqlen: int, tasks: str | None, split: str | None, limit: int | None,
         batch_size: int, dtype: str, device: str, json_path: str | None) -> None:
    """Perplexity and zero-shot multiple-choice accuracy of MODEL (HF folder or built-in name), offline.

    Perplexity follows the Wanda/SparseGPT protocol; accuracy is scored like lm-evaluation-harness
    (acc, length-normalised acc_norm, standard errors).
    """
    from seftkit.eval import evaluate_model

    report = evaluate_model(model, tasks=tasks, ppl=ppl_data, seqlen=seqlen, limit=limit, split=split,
                            batch_size=batch_size, device=device, dtype=dtype, progress=show_progress())
    click.echo(report.summary())
    write_report(json_path, report)
