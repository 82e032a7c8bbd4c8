"""SEFT against its baselines on the same pruned model, data order, seed, steps and trainable budget.

    python -m seftkit.bench.repair_compare [--methods seft,masked-lora] [--steps 40] [--lrs 1e-4,3e-4,1e-3]
    python -m seftkit.bench.repair_compare --data olmo:commonsense8 --max-per-task 1000 [...]

Two modes, by ``--data``: text repair (the default, ``olmo:lambada:train``; judged by held-out perplexity) and
task adaptation (multiple-choice tasks such as ``olmo:commonsense8``; judged by held-out accuracy).

Protocol (every number comes from this one run):
- the default model pruned to ``--sparsity`` with ``--prune-method`` (Wanda by default, calibrated on
  ``olmo:lambada:train``; cached in ``--workdir``), dense and pruned evaluation;
- every method x learning rate in a fresh subprocess, so step time belongs to that run alone;
- memory: each method once more at its best learning rate for ``update_interval + 1`` steps (its first topology
  update included), in a fresh process with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``, see
  :data:`ALLOCATOR_ENV`), so the RSS high-water mark (``VmHWM``) follows live tensors rather than freed
  temporaries that glibc's adaptive threshold keeps in the heap. That setting slows training (every large
  tensor is a fresh mmap), which is why the timed runs do not use it. The peak is reset after loading and
  reading every weight once (safetensors weights are memory-mapped, so a model is not resident until it is
  read); "+MB" is the peak minus that resident model, i.e. what training adds;
- text mode: held-out text ``olmo:lambada:heldout`` is split in two interleaved halves: ``val`` picks each
  method's best learning rate, ``test`` is what the table reports, so the sweep never sees the reported numbers;
- "gap closed" = (ppl_pruned - ppl_method) / (ppl_pruned - ppl_dense) on ``test``;
- zero-shot accuracy on ``--eval-tasks`` (their ``heldout`` split, first ``--eval-limit`` questions), reported
  for every run beside perplexity but never used to pick the learning rate.
- task mode: training uses each task's ``fit`` questions (its train split minus ``val``; ``--max-per-task``
  caps each task), the learning rate is picked by micro accuracy on the first ``--val-limit`` ``val`` questions
  of each task (``--select loglik``: by the gold answer's log-likelihood), and the table reports every
  ``heldout`` question (``--eval-limit`` caps them): micro and macro accuracy, each task's accuracy beside
  chance, the mean +- sd over seeds, and SEFT minus each method in micro accuracy with a 95% interval from a
  paired bootstrap over the questions (outcomes averaged over the seeds both methods have). Every run's 0/1
  outcome per question is saved, so runs made in parts combine.
A diverged run (NaN loss) is listed in the sweep and loses the selection. Every run is saved to ``--json`` the
moment it finishes (a sweep that dies keeps its finished runs: ``--reuse`` it to go on, ``--combine`` to print).
``--seft-option KEY=VALUE`` sets any other RepairConfig field for the SEFT methods only (e.g. a new evolution
knob), so new knobs need no bench change; ``--combine`` a file run with other SEFT settings (options, update
interval, drop rate, init) after the defaults' file and its SEFT methods become variants (``seft v1``) that pair
with the first file's ``seft``. ``--combine ... --plot P.png`` also draws a task-mode comparison: each method's
gain over the pruned model with its interval, and every task's accuracy above chance.

Task adaptation after pruning (issue 15's protocol), one command per part; each can also run a method at a
time (``--methods``, or one ``--lrs`` rate with ``--score-val``; own ``--json``, ``--reuse`` the first part for its
dense/pruned runs) and ``--combine``::

    C="--data olmo:commonsense8 --max-per-task 1000 --steps 120 --batch-size 8 --seqlen 128 --warmup-steps 12
       --max-grad-norm 1.0 --lora-rank-equivalent 8 --calib-samples 32 --extra-seeds 1,2 --no-memory"
    python -m seftkit.bench.repair_compare $C --sparsity 0.7 --json runs/tasks-wanda70.json
    python -m seftkit.bench.repair_compare $C --sparsity 0.5 --json runs/tasks-wanda50.json
    python -m seftkit.bench.repair_compare $C --sparsity 0.7 --prune-method magnitude
        --methods seft,seft-no-revive,masked-lora --json runs/tasks-magnitude70.json   (one line)

``--extra-seeds 1,2`` repeats each method at its chosen learning rate with those seeds (data order, LoRA
initialisation, SEFT's random choices) and adds the mean and spread of test perplexity over every seed: single
runs of these methods differ by several perplexity points from one seed to the next, more than the methods differ
from one another.

``--reuse EARLIER.json`` takes the dense and pruned evaluations and the baselines' sweep runs (lora-prune,
masked-lora, static: nothing of SEFT's code or settings reaches them) from an earlier ``--json`` whose shared
settings (model, pruning, data, steps, batch, budget, evaluation, seed) are identical, and marks them
"reused" (their extra-seed runs too); SEFT's runs only when they were made by the same library code and the
SEFT settings are the same too (a sweep that died, restarted); every memory run is measured anew. From an
earlier result that differs only in pruning or training (another sparsity or pruner) it takes the dense
evaluation alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path
from typing import Any

from seftkit.bench.repair_compare_plot import plot_task_comparison
from seftkit.bench.repair_compare_results import (
    SEFT_SETTINGS,
    combined_results,
    pick_best,
    reusable_runs,
    reused_run,
    reused_seed_run,
    save_results,
)
from seftkit.bench.repair_compare_table import format_report, format_task_report, is_task_result
from seftkit.bench.repair_compare_worker import (
    add_worker_options,
    code_fingerprint,
    ensure_pruned,
    run_job,
    serve_worker,
    worker,
)
from seftkit.data import DEFAULT_TRAIN_TEXT, parse_task_data
from seftkit.errors import SeftkitError
from seftkit.plot import check_plot_path
from seftkit.repair.config import RepairConfig
from seftkit.repair.registry import REPAIR_METHODS, build_method

DEFAULT_LRS = (1e-4, 3e-4, 1e-3)
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""For the memory runs: glibc otherwise raises its mmap threshold after the first freed multi-MB tensor and keeps
later ones in the heap, which inflates every method's RSS high-water mark by up to ~1 GB of freed temporaries
on this model (and by different amounts for different methods)."""


def parse_seft_options(options: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs onto RepairConfig fields, each value converted to the field's type (``none`` for
    None where the field allows it); SeftkitError (one line) for an unknown field or a bad value."""
    hints = typing.get_type_hints(RepairConfig)
    parsed: dict[str, Any] = {}
    for option in options:
        key, sep, text = option.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in hints:
            raise SeftkitError(f"--seft-option {option!r}: expected KEY=VALUE with KEY a RepairConfig field")
        kinds = [k for k in (typing.get_args(hints[key]) or (hints[key],)) if k is not type(None)]
        if text.strip().lower() == "none" and len(kinds) < len(typing.get_args(hints[key]) or (hints[key],)):
            parsed[key] = None
            continue
        kind = kinds[0]
        try:
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError("expected true or false")
                parsed[key] = text.lower() in ("true", "1")
            else:
                parsed[key] = kind(text) if kind in (int, float, str) else json.loads(text)
        except ValueError as exc:
            raise SeftkitError(f"--seft-option {option!r}: {exc}") from None
    return parsed


def training_data(args: argparse.Namespace) -> str:
    """What the runs train on: text as given; tasks' ``fit`` questions (their ``val`` ones pick the lr)."""
    parsed = parse_task_data(args.data)
    if parsed is None:
        return args.data
    tasks, split = parsed
    if split not in (None, "train", "fit"):
        raise SeftkitError(f"--data {args.data}: the bench trains on each task's train split (its fit part)")
    return f"olmo:{'+'.join(tasks)}:fit"


def repair_config(args: argparse.Namespace, method: str, lr: float, steps: int, seed: int | None = None
                  ) -> RepairConfig:
    """The shared settings of every run; only the method, learning rate, length and (extra runs) seed vary, and
    the SEFT methods get the evolution settings and ``--seft-option``."""
    shared = dict(method=method, data=training_data(args), max_per_task=args.max_per_task, steps=steps,
                  batch_size=args.batch_size, seqlen=args.seqlen, lr=lr, seed=args.seed if seed is None else seed,
                  lora_rank_equivalent=args.lora_rank_equivalent, warmup_steps=args.warmup_steps,
                  max_grad_norm=args.max_grad_norm, gradient_checkpointing=args.gradient_checkpointing,
                  device=args.device)
    if REPAIR_METHODS[method].baseline:
        return RepairConfig(**shared)
    options = parse_seft_options(args.seft_option)
    if "delta_density" in options:  # a density budget replaces the rank one
        shared["lora_rank_equivalent"] = None
    return RepairConfig(**shared, **{"update_interval": args.update_interval,
                                     "accumulation_steps": args.accumulation_steps, "drop_rate": args.drop_rate,
                                     "init": args.init, **options})


def evaluation_job(args: argparse.Namespace, selects: bool = True) -> dict[str, Any]:
    """The evaluation part of every job; only runs that take part in the learning-rate choice (``selects``)
    score the tasks' val questions."""
    if args.mode == "tasks":
        val = {"val_tasks": args.eval_tasks.split(","), "val_limit": args.val_limit} if selects else {}
        return {"mode": "tasks", "device": args.device, "eval_tasks": args.eval_tasks.split(","),
                "eval_limit": args.eval_limit, "eval_batch_size": args.eval_batch_size, **val}
    return {"mode": "text", "device": args.device, "eval_seqlen": args.eval_seqlen, "eval_windows": args.eval_windows,
            "eval_limit": args.eval_limit, "eval_tasks": [t for t in args.eval_tasks.split(",") if t]}


def resolve_mode(args: argparse.Namespace) -> None:
    """Task mode when ``--data`` names tasks; fill the defaults that depend on it (evaluated tasks, limits)."""
    from seftkit.eval.tasks import parse_task_names

    parsed = parse_task_data(args.data)
    args.mode = "tasks" if parsed else "text"
    if args.eval_tasks is None:
        args.eval_tasks = ",".join(parsed[0]) if parsed else "piqa,arc_easy"
    elif args.eval_tasks:
        args.eval_tasks = ",".join(parse_task_names(args.eval_tasks))
    if args.mode == "tasks" and not args.eval_tasks:
        raise SeftkitError("task mode needs --eval-tasks (the held-out questions are what it reports)")
    if args.eval_limit is None and args.mode == "text":
        args.eval_limit = 200
    if args.eval_limit == 0:
        args.eval_limit = None
    if args.mode == "text":
        args.val_limit = None


def summary(run: dict[str, Any]) -> str:
    """One progress line about a finished run."""
    if "error" in run:
        return run["error"]
    kind = "acc" if "test_acc" in run else "ppl"
    scores = [f"{part} {kind} {run[f'{part}_{kind}']:.4f}" for part in ("val", "test") if f"{part}_{kind}" in run]
    return ", ".join(scores + ([f"{run['step_time_s']:.2f} s/step"] if "step_time_s" in run else []))


def print_combined(paths: list[Path], plot: Path | None = None) -> None:
    """Print the parts as one comparison; ``plot``: also draw it (task mode) to that PNG."""
    if plot:
        check_plot_path(plot)
    saved = combined_results(paths)
    args = saved["args"]
    tasks = is_task_result(saved["pruned"])
    if plot and not tasks:
        raise ValueError("--plot draws a task-mode comparison; " + ("these results are text mode (perplexity)"
                         if saved["pruned"] else "none of the files holds the pruned model's scores"))
    for tag, changed in saved["variants"].items():
        print(f"SEFT {tag}: {changed} (the SEFT settings of {paths[0]} otherwise)")
    if tasks:
        print(format_task_report(saved["dense"], saved["pruned"], saved["sweep"], int(args["seed"]),
                                 args.get("select", "acc")))
    else:
        print(format_report(saved["dense"], saved["pruned"], saved["sweep"], int(args["seed"])))
    if plot:
        print(f"wrote {plot_task_comparison(saved, plot)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--prune-method", default="wanda", choices=("wanda", "magnitude", "sparsegpt"))
    parser.add_argument("--calib-samples", type=int, default=64, help="calibration windows of 512 tokens")
    parser.add_argument("--data", default=DEFAULT_TRAIN_TEXT, help="training data: text, or multiple-choice tasks "
                        "(olmo:commonsense8, olmo:boolq+piqa, ...) for task mode")
    parser.add_argument("--max-per-task", type=int, help="task mode: at most this many training questions per task")
    parser.add_argument("--methods", default=",".join(REPAIR_METHODS), help="comma-separated repair methods")
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in DEFAULT_LRS), help="the shared LR sweep")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--lora-rank-equivalent", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=0, help="for every method")
    parser.add_argument("--max-grad-norm", type=float, help="gradient clipping for every method (default: none)")
    parser.add_argument("--update-interval", type=int, default=10)
    parser.add_argument("--accumulation-steps", type=int, default=3)
    parser.add_argument("--drop-rate", type=float, default=RepairConfig.drop_rate, help="SEFT's p0")
    parser.add_argument("--init", default="grad-active", help="SEFT's initial slot choice (grad, grad-active, random)")
    parser.add_argument("--seft-option", action="append", default=[], metavar="KEY=VALUE",
                        help="any RepairConfig field, for the SEFT methods only (repeatable)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for every method")
    parser.add_argument("--device", default="cpu", help="where every run trains and evaluates (cpu, cuda)")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32, help="perplexity windows per held-out half")
    parser.add_argument("--eval-tasks", help="zero-shot tasks ('' for none in text mode) [default: piqa,arc_easy; "
                        "task mode: the --data tasks]")
    parser.add_argument("--eval-limit", type=int, help="held-out questions per task, 0 for all [default: 200; "
                        "task mode: all]")
    parser.add_argument("--val-limit", type=int, default=100, help="task mode: val questions per task that pick "
                        "the learning rate (0 for all)")
    parser.add_argument("--score-val", action="store_true", help="task mode: score the val questions even with a "
                        "single --lrs rate, so that a sweep run a rate per process picks its rate when --combine'd")
    parser.add_argument("--select", choices=("acc", "loglik"), default="acc",
                        help="task mode: pick the lr by val micro accuracy or by the gold answer's log-likelihood")
    parser.add_argument("--eval-batch-size", type=int, default=8, help="task mode: questions per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="the sweep's seed")
    parser.add_argument("--extra-seeds", default="", help="comma-separated seeds to repeat each method's chosen run "
                        "with (mean and spread over seeds)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-repair"))
    parser.add_argument("--json", type=Path, help="every run's numbers, saved as each run finishes "
                        "[default: <workdir>/repair_compare-<time>.json]")
    parser.add_argument("--reuse", type=Path, help="an earlier --json: reuse its dense/pruned and baseline runs "
                        "(and SEFT runs made by the same code and SEFT settings); only its dense scores when it "
                        "differs in pruning or training")
    parser.add_argument("--combine", help="comma-separated --json results of one protocol, run in parts (e.g. a "
                        "method at a time): print them as one comparison and run nothing; the SEFT methods of a "
                        "file with other SEFT settings than the first's are shown as variants (seft v1, ...)")
    parser.add_argument("--plot", type=Path, help="with --combine of task-mode results: also draw the comparison "
                        "(gain over the pruned model with its interval, accuracy above chance per task) to this PNG")
    add_worker_options(parser)
    args = parser.parse_args()
    if serve_worker(args, worker):
        return
    if args.plot and args.combine is None:
        parser.error("--plot draws a --combine'd comparison; give --combine")
    if args.combine is not None:
        try:
            print_combined([Path(p) for p in args.combine.split(",") if p.strip()], args.plot)
        except (ValueError, SeftkitError) as exc:
            parser.error(str(exc))
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in REPAIR_METHODS]
    if unknown:
        parser.error(f"unknown method {', '.join(unknown)}; choose from {', '.join(REPAIR_METHODS)}")
    lrs = [float(x) for x in args.lrs.split(",")]
    try:
        extra_seeds = [int(x) for x in args.extra_seeds.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--extra-seeds {args.extra_seeds!r}: expected comma-separated integers")
    if args.seed in extra_seeds or len(set(extra_seeds)) < len(extra_seeds):
        parser.error("--extra-seeds must be distinct and differ from --seed")
    if args.val_limit == 0:
        args.val_limit = None
    try:  # the trainer's own checks, before any work (a bad setting would otherwise fail every run in turn)
        resolve_mode(args)
        for method in methods:
            for lr in lrs:
                build_method(repair_config(args, method, lr, args.steps))
    except SeftkitError as exc:
        parser.error(str(exc))
    try:
        earlier = reusable_runs(args.reuse, args)
    except ValueError as exc:
        parser.error(str(exc))
    code = code_fingerprint()
    seft_code = code if all(earlier.get("args", {}).get(k) == str(getattr(args, k)) for k in SEFT_SETTINGS) else None
    out = args.json or args.workdir / f"repair_compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    print(f"results are saved to {out} as each run finishes", file=sys.stderr, flush=True)
    selects = len(lrs) > 1 or args.score_val
    evaluation = evaluation_job(args, selects=selects)
    reference = evaluation_job(args, selects=False)
    pruned_dir = ensure_pruned(args.model, args.sparsity, args.calib_samples, args.workdir, args.prune_method)
    sweep: dict[str, list[dict[str, Any]]] = {}
    dense = earlier.get("dense") or run_job({"model": args.model, **reference})
    save_results(out, args, dense, None, sweep)
    pruned = earlier.get("pruned") or run_job({"model": str(pruned_dir), **reference})
    save_results(out, args, dense, pruned, sweep)
    for method in methods:
        for lr in lrs:
            config = repair_config(args, method, lr, args.steps)
            run = reused_run(earlier, method, lr, seft_code, needs_val=selects) or {
                "lr": lr, **run_job({"model": str(pruned_dir), "config": dataclasses.asdict(config), **evaluation})}
            sweep.setdefault(method, []).append(run)
            save_results(out, args, dense, pruned, sweep)
            print(f"{method} lr {lr:g}: {summary(run)}", file=sys.stderr, flush=True)
    best = {method: pick_best(runs, args.select) for method, runs in sweep.items()}
    for method, run in best.items():
        for seed in extra_seeds if run is not None else []:
            config = repair_config(args, method, run["lr"], args.steps, seed)
            extra = reused_seed_run(earlier, method, run["lr"], seed, seft_code) or {
                "seed": seed, **run_job({"model": str(pruned_dir), "config": dataclasses.asdict(config), **reference})}
            run.setdefault("seeds", []).append(extra)
            save_results(out, args, dense, pruned, sweep)
            print(f"{method} seed {seed}: {summary(extra)}", file=sys.stderr, flush=True)
    for method, run in best.items() if not args.no_memory else ():
        if run is not None:
            config = repair_config(args, method, run["lr"], args.update_interval + 1)
            run["memory"] = run_job({"model": str(pruned_dir), "config": dataclasses.asdict(config), "evaluate": False,
                                     "device": args.device}, env=ALLOCATOR_ENV)
            save_results(out, args, dense, pruned, sweep)
            outcome = run["memory"].get("error") or f"{run['memory']['peak_rss_mb']:.0f} MB peak"
            print(f"{method} memory: {outcome}", file=sys.stderr, flush=True)
    if args.mode == "tasks":
        print(format_task_report(dense, pruned, sweep, args.seed, args.select))
    else:
        print(format_report(dense, pruned, sweep, args.seed))


if __name__ == "__main__":
    main()
