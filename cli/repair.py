"""``seftkit repair``: SEFT (or a baseline) on a pruned model; the output keeps the input's sparsity exactly."""

from __future__ import annotations

from pathlib import Path

import click

from seftkit.cli.common import device_option, handle_errors, json_option, show_progress, write_report
from seftkit.models import DTYPE_CHOICES
from seftkit.repair.config import (
    DEFAULT_LORA_RANK_EQUIVALENT,
    DROP_SCHEDULES,
    EVICTIONS,
    GROW_SCORES,
    INIT_MODES,
    STRATEGIES,
    RepairConfig,
)
from seftkit.repair.registry import REPAIR_METHODS, fsdp_methods

D = RepairConfig  # every default below is the config's own
METHOD_HELP = "; ".join(f"{name}: {entry.summary}" for name, entry in REPAIR_METHODS.items())


@click.command()
@click.argument("model")
@click.option("--data", default=D.data, show_default=True,
              help="Training data: text (file, JSONL, Arrow, olmo:lambada:train) or multiple-choice tasks "
                   "(olmo:piqa, olmo:boolq+piqa, olmo:commonsense8 for the eight-task commonsense mix), trained on "
                   "their train split with loss on the answer only.")
@click.option("--max-per-task", type=int,
              help="Task data: train on a seeded sample of at most N questions per task [default: all].")
@click.option("--method", type=click.Choice(list(REPAIR_METHODS)), default=D.method, show_default=True,
              help=METHOD_HELP + ".")
@click.option("--steps", type=int, default=D.steps, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=int, default=D.batch_size, show_default=True)
@click.option("--grad-accum", type=int, default=D.grad_accum, show_default=True, help="Micro-batches per step.")
@click.option("--seqlen", type=int, default=D.seqlen, show_default=True, help="Tokens per text window.")
@click.option("--lr", type=float, default=D.lr, show_default=True, help="Peak learning rate (linear decay to 0).")
@click.option("--warmup-steps", type=int, default=D.warmup_steps, show_default=True)
@click.option("--weight-decay", type=float, default=D.weight_decay, show_default=True)
@click.option("--max-grad-norm", type=float,
              help="Clip the global norm of the trainable gradients before each step [default: no clipping].")
@click.option("--delta-density", type=float, help="Budget: trainable fraction of each layer's weights.")
@click.option("--lora-rank-equivalent", type=int,
              help="Budget: r * (in + out) per layer, a rank-r LoRA's count "
              f"[default: {DEFAULT_LORA_RANK_EQUIVALENT} without --delta-density].")
@click.option("--update-interval", type=int, default=D.update_interval, show_default=True,
              help="SEFT: steps between evolutions.")
@click.option("--accumulation-steps", type=int, default=D.accumulation_steps, show_default=True,
              help="SEFT: backward passes that accumulate growth candidates before each evolution.")
@click.option("--drop-rate", type=float, default=D.drop_rate, show_default=True, help="SEFT: initial drop fraction p0.")
@click.option("--drop-schedule", type=click.Choice(DROP_SCHEDULES), default=D.drop_schedule, show_default=True,
              help="SEFT: how the drop fraction decays from p0 over the run.")
@click.option("--init", "init", type=click.Choice(INIT_MODES), default=D.init,
              show_default=True, help="SEFT: initial slots from accumulated gradients (anywhere, or only inside "
              "the active set), or at random.")
@click.option("--keep-regrown/--restart-regrown", default=D.keep_regrown, show_default=True,
              help="SEFT: a dropped slot that growth picks again keeps its value and Adam state (SpIEL), or "
              "restarts at 0.")
@click.option("--eviction", type=click.Choice(EVICTIONS), default=D.eviction, show_default=True,
              help="SEFT: revived weights evict the least sensitive active weights of the whole matrix, or of "
              "their own output row (every row keeps its nnz).")
@click.option("--grow-score", type=click.Choice(GROW_SCORES), default=D.grow_score, show_default=True,
              help="SEFT: rank growth candidates by the window's sum of |g|, or by |sum of g| (SpIEL).")
@click.option("--revived-lr-scale", type=float, default=D.revived_lr_scale, show_default=True,
              help="SEFT: learning-rate multiplier for slots on revived (pruned) positions.")
@click.option("--nm", help="Keep an N:M pattern (the input must already have it), e.g. 2:4.")
@click.option("--include", help="Regex of weight names to repair (replaces the default decoder-block rule).")
@click.option("--exclude", help="Regex of weight names to leave untouched.")
@click.option("--eval-ppl", help="Perplexity data before and after, e.g. olmo:lambada:heldout.")
@click.option("--eval-tasks", help="Tasks scored before and after on their heldout split (comma- or +-separated, "
              "or olmo:commonsense8).")
@click.option("--eval-limit", type=int, help="Questions per task.")
@click.option("--eval-windows", type=int, help="Perplexity on the first N windows of --eval-ppl [default: all].")
@device_option
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=D.dtype, show_default=True,
              help="Weight dtype in memory and in the output (auto: the input's); trained values and optimizer "
                   "state are fp32 (static trains fp32 weights); bf16 autocast on CUDA.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward (less memory).")
@click.option("--strategy", type=click.Choice(STRATEGIES),
              help="Under torchrun/accelerate: replicate the model (ddp) or shard its frozen weights over the "
              f"processes (fsdp: {', '.join(fsdp_methods())}) [default: ddp, fsdp under accelerate's FSDP].")
@click.option("--checkpoint-every", type=int, help="Write a resumable checkpoint to <out>.ckpt every N steps.")
@click.option("--resume", is_flag=True, help="Continue from <out>.ckpt after an interruption.")
@click.option("--seed", type=int, default=D.seed, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), help="Output folder [default: <model>-<method>].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@json_option
@handle_errors
def repair(model: str, out: str | None, overwrite: bool, resume: bool, eval_tasks: str | None, json_path: str | None,
           **options) -> None:
    """Repair a sparse MODEL (HF folder or built-in name) with SEFT or a baseline, keeping its sparsity.

    Runs as is under torchrun --nproc-per-node N (DDP, or FSDP with --strategy fsdp; --batch-size is per
    process).
    """
    from seftkit.distributed import world
    from seftkit.eval.tasks import parse_task_names
    from seftkit.plot import plot_beside
    from seftkit.repair import repair_checkpoint

    config = RepairConfig(eval_tasks=parse_task_names(eval_tasks) if eval_tasks else [], **options)
    out = out or f"{Path(model.rstrip('/')).name}-{config.method}"
    report = repair_checkpoint(model, config, out, overwrite=overwrite, resume=resume, progress=show_progress())
    if not world().is_main:  # under torchrun only rank 0 reports
        return
    click.echo("\n".join(report.summary_lines()))
    write_report(json_path, report)
    if json_path and (picture := plot_beside(json_path)):
        click.echo(f"wrote {picture}")
