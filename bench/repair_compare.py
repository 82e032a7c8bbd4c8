"""SEFT against its baselines on the same pruned model, data order, seed, steps and trainable budget.

    python -m seftkit.bench.repair_compare [--methods seft,masked-lora] [--steps 40] [--lrs 1e-4,3e-4,1e-3]

Protocol (every number comes from this one run):
- the default model pruned to ``--sparsity`` with Wanda (cached in ``--workdir``), dense and pruned perplexity;
- every method x learning rate in a fresh subprocess, so step time belongs to that run alone;
- memory: each method once more at its best learning rate for ``update_interval + 1`` steps (its first topology
  update included), in a fresh process with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``, see
  :data:`ALLOCATOR_ENV`), so the RSS high-water mark (``VmHWM``) follows live tensors rather than freed
  temporaries that glibc's adaptive threshold keeps in the heap. That setting slows training (every large
  tensor is a fresh mmap), which is why the timed runs do not use it. The peak is reset after loading and
  reading every weight once (safetensors weights are memory-mapped, so a model is not resident until it is
  read); "+MB" is the peak minus that resident model, i.e. what training adds;
- held-out text ``olmo:lambada:heldout`` is split in two interleaved halves: ``val`` picks each method's
  best learning rate, ``test`` is what the table reports, so the sweep never sees the reported numbers;
- "gap closed" = (ppl_pruned - ppl_method) / (ppl_pruned - ppl_dense) on ``test``;
- zero-shot accuracy on ``--eval-tasks`` (their ``heldout`` split, first ``--eval-limit`` questions), reported
  for every run beside perplexity but never used to pick the learning rate.
A diverged run (NaN loss) is listed in the sweep and loses the selection.

``--extra-seeds 1,2`` repeats each method at its chosen learning rate with those seeds (data order, LoRA
initialisation, SEFT's random choices) and adds the mean and spread of test perplexity over every seed: single
runs of these methods differ by several perplexity points from one seed to the next, more than the methods differ
from one another.

``--reuse EARLIER.json`` takes the dense and pruned evaluations and the baselines' sweep runs (lora-prune,
masked-lora, static: nothing of SEFT's code or settings reaches them) from an earlier ``--json`` whose shared
settings (model, pruning, data, steps, batch, budget, evaluation, seed) are identical, and marks them
"reused" (their extra-seed runs too); SEFT's runs and every memory run are always measured anew.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from seftkit.data import DEFAULT_HELDOUT_TEXT, DEFAULT_TRAIN_TEXT
from seftkit.errors import SeftkitError
from seftkit.repair.config import METHODS, RepairConfig
from seftkit.repair.trainer import check_config, make_method

DEFAULT_LRS = (1e-4, 3e-4, 1e-3)
BASELINES = ("lora-prune", "masked-lora", "static")
SHARED_SETTINGS = ("model", "sparsity", "calib_samples", "steps", "batch_size", "seqlen", "lora_rank_equivalent",
                   "warmup_steps", "max_grad_norm", "gradient_checkpointing", "eval_seqlen", "eval_windows",
                   "eval_tasks", "eval_limit", "seed")
"""Everything a baseline's numbers depend on (the SEFT knobs are not among them)."""
ADDED_SETTINGS = {"warmup_steps": "0", "max_grad_norm": "None"}
"""Shared settings newer than some earlier results: a result without one was run at this value."""
WANDA_SEQLEN = 512
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""For the memory runs: glibc otherwise raises its mmap threshold after the first freed multi-MB tensor and keeps
later ones in the heap, which inflates every method's RSS high-water mark by up to ~1 GB of freed temporaries
on this model (and by different amounts for different methods)."""


def heldout_halves() -> tuple[list[str], list[str]]:
    """``val`` (LR selection) and ``test`` (reported): alternate passages of the held-out text."""
    from seftkit.data import load_texts

    texts = load_texts(DEFAULT_HELDOUT_TEXT)
    return texts[0::2], texts[1::2]


def ensure_pruned(model: str, sparsity: float, samples: int, workdir: Path) -> Path:
    """The Wanda-pruned model folder (``samples`` calibration windows), made once and reused by every run."""
    from seftkit.prune import prune_checkpoint
    from seftkit.sparsity.pattern import parse_pattern

    out = workdir / f"{Path(model).name}-wanda-{round(sparsity * 100)}-n{samples}"
    if not (out / "config.json").is_file():
        prune_checkpoint(model, "wanda", parse_pattern(sparsity), out=out, nsamples=samples,
                         seqlen=WANDA_SEQLEN, device="cpu")
    return out


def reset_peak_rss() -> None:
    """Reset the kernel's resident-memory high-water mark (Linux ``clear_refs`` 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_since_reset_mb() -> float:
    """``VmHWM``: the resident high-water mark since the last :func:`reset_peak_rss`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (the memory columns need Linux)")


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One measured run (inside its own process): optional repair, then val/test perplexity."""
    import psutil

    from seftkit.eval import evaluate, perplexity
    from seftkit.models import check_finite, load_model
    from seftkit.repair import repair_model

    model, tokenizer = load_model(job["model"], device="cpu")
    check_finite(model)  # reads every weight, so the memory-mapped model is resident before the baseline
    loaded_mb = psutil.Process().memory_info().rss / 2**20
    result: dict[str, Any] = {"loaded_rss_mb": loaded_mb}
    if job.get("config"):
        reset_peak_rss()  # loading can spike above what training needs; measure training alone
        report = repair_model(model, tokenizer, RepairConfig(**job["config"]), progress=False)
        peak_mb = peak_rss_since_reset_mb()
        result.update(trainable=report.trainable_params, step_time_s=report.step_time_s, peak_rss_mb=peak_mb,
                      train_extra_mb=peak_mb - loaded_mb, final_loss=report.final_loss, summary=report.method_summary)
    if not job.get("evaluate", True):
        return result
    val, test = heldout_halves()
    for name, texts in (("val", val), ("test", test)):
        result[f"{name}_ppl"] = perplexity(model, tokenizer, texts, seqlen=job["eval_seqlen"],
                                           max_windows=job["eval_windows"], progress=False).ppl
    if job.get("eval_tasks"):
        tasks = evaluate(model, tokenizer, tasks=job["eval_tasks"], limit=job["eval_limit"], split="heldout",
                         progress=False)
        result["acc"] = {name: task.acc for name, task in tasks.tasks.items()}
        result["mean_acc"] = tasks.mean_acc
    return result


def run_job(job: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter (``env`` added to its environment); a diverged or failed run
    is reported, not raised."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "job.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "seftkit.bench.repair_compare", "--worker", str(spec),
                               "--result", str(out)], capture_output=True, text=True,
                              env={**os.environ, **(env or {})})
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            return {"error": lines[-1] if lines else f"exit code {proc.returncode}"}
        return json.loads(out.read_text())


def reusable_runs(path: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    """The earlier result at ``path`` when its shared settings equal ``args``', or {} without a path; ValueError
    (one line) for an unreadable file or other settings."""
    if path is None:
        return {}
    try:
        earlier = json.loads(path.read_text())
        recorded = earlier["args"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--reuse {path}: not a readable repair_compare --json result ({exc})") from None
    differing = [key for key in SHARED_SETTINGS
                 if recorded.get(key, ADDED_SETTINGS.get(key)) != str(getattr(args, key))]
    if differing:
        raise ValueError(f"--reuse {path}: its settings differ in {', '.join(differing)}; nothing can be reused")
    return earlier


def reused_run(earlier: dict[str, Any], method: str, lr: float) -> dict[str, Any] | None:
    """A baseline's run at ``lr`` from the earlier result (its memory run and extra seeds dropped: memory is
    measured anew, seeds are looked up one by one with :func:`reused_seed_run`)."""
    if method not in BASELINES:
        return None
    for run in earlier.get("sweep", {}).get(method, []):
        if run["lr"] == lr and "error" not in run:
            return {**{k: v for k, v in run.items() if k not in ("memory", "seeds")}, "reused": True}
    return None


def reused_seed_run(earlier: dict[str, Any], method: str, lr: float, seed: int) -> dict[str, Any] | None:
    """A baseline's extra-seed run at ``lr`` and ``seed`` from the earlier result, if it has one that succeeded."""
    if method not in BASELINES:
        return None
    for run in earlier.get("sweep", {}).get(method, []):
        for extra in run.get("seeds", []) if run["lr"] == lr else []:
            if extra["seed"] == seed and "error" not in extra:
                return {**extra, "reused": True}
    return None


def pick_best(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in runs if "error" not in r and math.isfinite(r["val_ppl"])]
    return min(ok, key=lambda r: r["val_ppl"]) if ok else None


REFERENCES = ("masked-lora", "static")


def ratios(value: float, refs: dict[str, float], names: tuple[str, ...] = REFERENCES) -> str:
    """``value`` over each named reference method's, or ``-`` where that method was not run."""
    return "".join(f"{value / refs[k]:>8.2f}" if k in refs else f"{'-':>8}" for k in names)


def accuracy(run: dict[str, Any]) -> str:
    """`` (piqa 0.640, arc_easy 0.480)``: a run's zero-shot accuracies, or nothing when none were measured."""
    scores = run.get("acc") or {}
    return f" ({', '.join(f'{name} {acc:.3f}' for name, acc in scores.items())})" if scores else ""


def measured_memory(run: dict[str, Any]) -> dict[str, Any] | None:
    """A method's memory run, or None where it was not run or failed."""
    memory = run.get("memory")
    return None if memory is None or "error" in memory else memory


def memory_cells(run: dict[str, Any], ref_peak: dict[str, float], ref_extra: dict[str, float]) -> str:
    """Peak and +MB of a method's memory run, each with its ratios to the references."""
    memory = measured_memory(run)
    if memory is None:
        return f"{'failed':>9}{'':>40}"
    return (f"{memory['peak_rss_mb']:>9.0f}{ratios(memory['peak_rss_mb'], ref_peak)}"
            f"{memory['train_extra_mb']:>8.0f}{ratios(memory['train_extra_mb'], ref_extra)}")


def format_table(dense: dict, pruned: dict, best: dict[str, dict | None]) -> list[str]:
    """One row per method; memory (from the memory runs) as the whole peak and as what training adds (+MB),
    each over masked-lora's and static's, and step time (from the timed runs) over masked-lora's."""
    gap = pruned["test_ppl"] - dense["test_ppl"]
    refs = {name: best[name] for name in REFERENCES if best.get(name)}
    measured = {name: memory for name, run in refs.items() if (memory := measured_memory(run)) is not None}
    ref_peak = {name: memory["peak_rss_mb"] for name, memory in measured.items()}
    ref_extra = {name: memory["train_extra_mb"] for name, memory in measured.items()}
    ref_time = {name: run["step_time_s"] for name, run in refs.items()}
    lines = [f"dense test ppl {dense['test_ppl']:.3f}{accuracy(dense)}, pruned {pruned['test_ppl']:.3f}"
             f"{accuracy(pruned)}",
             f"{'method':<16}{'lr':>8}{'trainable':>12}{'test ppl':>10}{'gap closed':>12}{'acc':>8}"
             f"{'peak MB':>9}{'/mlora':>8}{'/static':>8}{'+MB':>8}{'/mlora':>8}{'/static':>8}"
             f"{'s/step':>8}{'/mlora':>8}"]
    for name, run in best.items():
        if run is None:
            lines.append(f"{name:<16}  every learning rate failed")
            continue
        lines.append(
            f"{name:<16}{run['lr']:>8.0e}{run['trainable']:>12,}{run['test_ppl']:>10.3f}"
            f"{(pruned['test_ppl'] - run['test_ppl']) / gap:>12.1%}{run.get('mean_acc') or float('nan'):>8.3f}"
            f"{memory_cells(run, ref_peak, ref_extra)}"
            f"{run['step_time_s']:>8.2f}{ratios(run['step_time_s'], ref_time, REFERENCES[:1])}"
        )
    return lines


def seed_values(run: dict[str, Any], seed: int) -> tuple[dict[int, float], list[int]]:
    """Test perplexity by seed of a method's chosen run (at ``seed``) and its extra-seed runs, and the seeds
    whose runs failed or diverged."""
    values, failed = {seed: run["test_ppl"]}, []
    for extra in run.get("seeds", []):
        if "error" in extra or not math.isfinite(extra["test_ppl"]):
            failed.append(extra["seed"])
        else:
            values[extra["seed"]] = extra["test_ppl"]
    return values, failed


def format_seeds(dense: dict, pruned: dict, best: dict[str, dict | None], seed: int) -> list[str]:
    """Per method with extra seeds: test perplexity at every seed, mean +- sample sd, gap closed by the mean."""
    gap = pruned["test_ppl"] - dense["test_ppl"]
    lines = []
    for name, run in best.items():
        if not run or not run.get("seeds"):
            continue
        values, failed = seed_values(run, seed)
        mean, sd = _mean_sd(list(values.values()))
        cells = ", ".join(f"{s}: {v:.2f}" for s, v in values.items())
        paired = ""
        if name != PAIRED_REFERENCE and (ref := best.get(PAIRED_REFERENCE)) and ref.get("seeds"):
            ref_values = seed_values(ref, seed)[0]
            diffs = [ref_values[s] - v for s, v in values.items() if s in ref_values]
            paired = (f"  {PAIRED_REFERENCE} minus this, same seeds: {_format_mean_sd(*_mean_sd(diffs))}"
                      f" (n={len(diffs)})")
        lines.append(f"  {name:<16}mean {_format_mean_sd(mean, sd)}  gap closed "
                     f"{(pruned['test_ppl'] - mean) / gap:6.1%}  ({cells})" + paired
                     + (f"  failed seeds: {', '.join(map(str, failed))}" if failed else ""))
    if not lines:
        return []
    return ["", f"over seeds (test ppl at each method's chosen lr, seed {seed} first; sd: sample):", *lines]


PAIRED_REFERENCE = "seft"
"""Methods with extra seeds are also compared with SEFT seed by seed: a seed fixes the data order for every
method, so the paired difference is free of the part of the spread that the data order causes for all."""


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


def _format_mean_sd(mean: float, sd: float) -> str:
    return f"{mean:8.2f} +- {sd:5.2f}"


COMBINE_FREE = ("methods", "lrs", "extra_seeds", "json", "reuse", "workdir", "worker", "result", "combine")
"""Arguments that may differ between the saved results ``--combine`` prints as one comparison."""


def combined_results(paths: list[Path]) -> dict[str, Any]:
    """Saved ``--json`` results of one protocol run in parts, as one (the first file's dense and pruned runs);
    ValueError (one line) for unreadable files, other settings, or a method present in two files."""
    if not paths:
        raise ValueError("--combine needs at least one --json result")
    results = []
    for path in paths:
        try:
            result = json.loads(path.read_text())
            if not isinstance(result["args"], dict) or not isinstance(result["sweep"], dict):
                raise TypeError("its args and sweep are not objects")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--combine {path}: not a readable repair_compare --json result ({exc})") from None
        results.append(result)
    first, sweep = results[0], {}
    for path, result in zip(paths, results, strict=True):
        keys = (set(first["args"]) | set(result["args"])) - set(COMBINE_FREE)
        differing = sorted(k for k in keys if first["args"].get(k) != result["args"].get(k))
        if differing:
            raise ValueError(f"--combine {path}: its settings differ from {paths[0]}'s in {', '.join(differing)}")
        for method, runs in result["sweep"].items():
            if method in sweep:
                raise ValueError(f"--combine {path}: {method} is in two of the files")
            sweep[method] = runs
    return {"args": first["args"], "dense": first["dense"], "pruned": first["pruned"], "sweep": sweep}


def format_report(dense: dict, pruned: dict, sweep: dict[str, list[dict[str, Any]]], seed: int) -> str:
    best = {method: pick_best(runs) for method, runs in sweep.items()}
    return "\n".join([*format_sweep(sweep), "", *format_table(dense, pruned, best),
                      *format_seeds(dense, pruned, best, seed)])


def format_sweep(sweep: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["learning-rate sweep (val ppl; the lowest is used):"]
    for name, runs in sweep.items():
        cells = [f"{r['lr']:.0e}: " + (r["error"][:40] if "error" in r else f"{r['val_ppl']:.3f}{accuracy(r)}")
                 + (" reused" if r.get("reused") else "") for r in runs]
        lines.append(f"  {name:<16}" + "   ".join(cells))
    return lines


def repair_config(args: argparse.Namespace, method: str, lr: float, steps: int, seed: int | None = None
                  ) -> RepairConfig:
    """The shared settings of every run; only the method, learning rate, length and (extra runs) seed vary."""
    return RepairConfig(method=method, data=DEFAULT_TRAIN_TEXT, steps=steps, batch_size=args.batch_size,
                        seqlen=args.seqlen, lr=lr, seed=args.seed if seed is None else seed,
                        lora_rank_equivalent=args.lora_rank_equivalent,
                        warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm,
                        update_interval=args.update_interval, accumulation_steps=args.accumulation_steps,
                        drop_rate=args.drop_rate, init=args.init, gradient_checkpointing=args.gradient_checkpointing,
                        device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--calib-samples", type=int, default=64, help=f"Wanda windows of {WANDA_SEQLEN} tokens")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated repair methods")
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
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for every method")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32, help="perplexity windows per held-out half")
    parser.add_argument("--eval-tasks", default="piqa,arc_easy", help="zero-shot tasks ('' for none)")
    parser.add_argument("--eval-limit", type=int, default=200, help="questions per task")
    parser.add_argument("--seed", type=int, default=0, help="the sweep's seed")
    parser.add_argument("--extra-seeds", default="", help="comma-separated seeds to repeat each method's chosen run "
                        "with (mean and spread of test ppl)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-repair"))
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    parser.add_argument("--reuse", type=Path, help="an earlier --json: reuse its dense/pruned and baseline runs")
    parser.add_argument("--combine", help="comma-separated --json results of one protocol, run in parts (e.g. a "
                        "method at a time): print them as one comparison and run nothing")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.result.write_text(json.dumps(worker(json.loads(args.worker.read_text()))))
        return
    if args.combine:
        try:
            saved = combined_results([Path(p) for p in args.combine.split(",") if p.strip()])
        except ValueError as exc:
            parser.error(str(exc))
        print(format_report(saved["dense"], saved["pruned"], saved["sweep"], int(saved["args"]["seed"])))
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    lrs = [float(x) for x in args.lrs.split(",")]
    try:
        extra_seeds = [int(x) for x in args.extra_seeds.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--extra-seeds {args.extra_seeds!r}: expected comma-separated integers")
    if args.seed in extra_seeds or len(set(extra_seeds)) < len(extra_seeds):
        parser.error("--extra-seeds must be distinct and differ from --seed")
    try:  # the trainer's own checks, before any work (a bad setting would otherwise fail every run in turn)
        for method in methods:
            for lr in lrs:
                config = repair_config(args, method, lr, args.steps)
                check_config(config)
                make_method(config)
    except SeftkitError as exc:
        parser.error(str(exc))
    evaluation = {"eval_seqlen": args.eval_seqlen, "eval_windows": args.eval_windows, "eval_limit": args.eval_limit,
                  "eval_tasks": [t.strip() for t in args.eval_tasks.split(",") if t.strip()]}
    try:
        earlier = reusable_runs(args.reuse, args)
    except ValueError as exc:
        parser.error(str(exc))
    pruned_dir = ensure_pruned(args.model, args.sparsity, args.calib_samples, args.workdir)
    dense = earlier.get("dense") or run_job({"model": args.model, **evaluation})
    pruned = earlier.get("pruned") or run_job({"model": str(pruned_dir), **evaluation})
    sweep: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        for lr in lrs:
            config = repair_config(args, method, lr, args.steps)
            run = reused_run(earlier, method, lr) or {
                "lr": lr, **run_job({"model": str(pruned_dir), "config": dataclasses.asdict(config), **evaluation})}
            sweep.setdefault(method, []).append(run)
            print(f"{method} lr {lr:g}: " + (run["error"] if "error" in run else
                  f"val ppl {run['val_ppl']:.3f}, {run['step_time_s']:.2f} s/step"), file=sys.stderr, flush=True)
    best = {method: pick_best(runs) for method, runs in sweep.items()}
    for method, run in best.items():
        for seed in extra_seeds if run is not None else []:
            config = repair_config(args, method, run["lr"], args.steps, seed)
            extra = reused_seed_run(earlier, method, run["lr"], seed) or {
                "seed": seed, **run_job({"model": str(pruned_dir), "config": dataclasses.asdict(config), **evaluation})}
            run.setdefault("seeds", []).append(extra)
            print(f"{method} seed {seed}: " + (extra["error"] if "error" in extra else
                  f"test ppl {extra['test_ppl']:.3f}"), file=sys.stderr, flush=True)
    for method, run in best.items():
        if run is not None:
            config = repair_config(args, method, run["lr"], args.update_interval + 1)
            run["memory"] = run_job({"model": str(pruned_dir), "config": dataclasses.asdict(config), "evaluate": False},
                                    env=ALLOCATOR_ENV)
            outcome = run["memory"].get("error") or f"{run['memory']['peak_rss_mb']:.0f} MB peak"
            print(f"{method} memory: {outcome}", file=sys.stderr, flush=True)
    print(format_report(dense, pruned, sweep, args.seed))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "dense": dense,
                                         "pruned": pruned, "sweep": sweep}, indent=2))


if __name__ == "__main__":
    main()
