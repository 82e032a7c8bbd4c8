"""The repair bench's printed comparison: per method its chosen run, the spread over seeds and the paired
difference to SEFT. Text mode reports held-out perplexity and memory; task mode micro/macro accuracy, every
task's accuracy beside chance, each method's gain over the pruned model and its paired difference to SEFT, both
with a paired bootstrap interval over the held-out questions.
"""

from __future__ import annotations

import math
from typing import Any

from seftkit.bench.repair_compare_results import (
    BOOTSTRAP_RESAMPLES,
    PAIRED_REFERENCE,
    mean_sd,
    paired_bootstrap,
    pick_best,
    scored_on_val,
    seed_runs,
)

REFERENCES = ("masked-lora", "static")
SKILL_SUBSET = "dense above chance"


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
        return f"{'failed' if 'memory' in run else '-':>9}{'':>40}"
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
        mean, sd = mean_sd(list(values.values()))
        cells = ", ".join(f"{s}: {v:.2f}" for s, v in values.items())
        paired = ""
        if name != PAIRED_REFERENCE and (ref := best.get(PAIRED_REFERENCE)) and ref.get("seeds"):
            ref_values = seed_values(ref, seed)[0]
            diffs = [ref_values[s] - v for s, v in values.items() if s in ref_values]
            paired = (f"  {PAIRED_REFERENCE} minus this, same seeds: {format_mean_sd(*mean_sd(diffs))}"
                      f" (n={len(diffs)})")
        lines.append(f"  {name:<16}mean {format_mean_sd(mean, sd)}  gap closed "
                     f"{(pruned['test_ppl'] - mean) / gap:6.1%}  ({cells})" + paired
                     + (f"  failed seeds: {', '.join(map(str, failed))}" if failed else ""))
    if not lines:
        return []
    return ["", f"over seeds (test ppl at each method's chosen lr, seed {seed} first; sd: sample):", *lines]


def format_mean_sd(mean: float, sd: float) -> str:
    return f"{mean:8.2f} +- {sd:5.2f}"


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




def is_task_result(run: dict[str, Any] | None) -> bool:
    return bool(run) and "test_acc" in run


def format_task_report(dense: dict, pruned: dict, sweep: dict[str, list[dict[str, Any]]], seed: int,
                       select: str = "acc") -> str:
    """Task mode: the sweep on val, the held-out table, the spread over seeds, the paired differences to SEFT
    and every task's margin over chance."""
    best = {method: pick_best(runs, select) for method, runs in sweep.items()}
    tasks = list(pruned["acc"])
    subsets = task_subsets(dense, tasks)
    skilled = subsets.get(SKILL_SUBSET)
    return "\n".join([*format_task_sweep(sweep, select), "", *format_task_table(dense, pruned, best, tasks, seed),
                      *format_task_seeds(best, tasks, seed),
                      *format_gain_over_pruned(dense, pruned, best, subsets, seed), *format_paired(best, tasks, seed),
                      *(format_paired(best, skilled, seed, "only the tasks the dense model answers above chance ("
                                      + ", ".join(skilled) + ")") if skilled else []),
                      *format_chance_margins(dense, pruned, best, tasks, seed)])


def task_subsets(dense: dict, tasks: list[str]) -> dict[str, list[str]]:
    """All tasks, and the tasks the dense model answers above chance when that is fewer but not none."""
    skilled = above_chance(dense, tasks)
    return {"all tasks": tasks, **({SKILL_SUBSET: skilled} if skilled and skilled != tasks else {})}


def margin_over_chance(acc: float, chance: float, n: int) -> tuple[float, float]:
    """Accuracy minus chance, and that accuracy's standard error over ``n`` questions."""
    return acc - chance, math.sqrt(max(acc * (1 - acc), 1e-12) / n)


def above_chance(run: dict, tasks: list[str]) -> list[str]:
    """The tasks ``run`` answers more than two standard errors above chance: where there is skill to recover
    (chosen from the dense model, never from the methods compared)."""
    margins = {t: margin_over_chance(run["acc"][t], run["chance"][t], run["n"][t]) for t in tasks}
    return [t for t, (margin, se) in margins.items() if margin > 2 * se]


def format_task_sweep(sweep: dict[str, list[dict[str, Any]]], select: str) -> list[str]:
    rule = ("the highest gold-answer log-likelihood" if select == "loglik"
            else "the highest accuracy (log-likelihood breaks ties)")
    lines = [f"learning-rate sweep (val micro accuracy [gold-answer log-likelihood] on the val questions carved "
             f"from each task's train split, never trained on; {rule} is used):"]
    if not any(scored_on_val(r) for runs in sweep.values() for r in runs):
        return ["one learning rate per method (no sweep): nothing scored on val"]
    for name, runs in sweep.items():
        cells = [f"{r['lr']:.0e}: {_val_cell(r)}" + (" reused" if r.get("reused") else "") for r in runs]
        lines.append(f"  {name:<16}" + "   ".join(cells))
    return lines


def _val_cell(run: dict[str, Any]) -> str:
    if "error" in run:
        return run["error"][:40]
    if not scored_on_val(run):
        return "not scored (one rate)"
    return f"{run['val_acc']:.4f} [{run['val_gold_loglik']:.3f}]"


def _task_cells(run: dict[str, Any], tasks: list[str]) -> str:
    return "".join(f"{run['acc'][t]:>9.3f}" for t in tasks)


def format_task_table(dense: dict, pruned: dict, best: dict[str, dict | None], tasks: list[str], seed: int
                      ) -> list[str]:
    """Held-out accuracy of the dense and pruned models and of each method's chosen run (seed ``seed``)."""
    questions = sum(pruned["n"].values())
    lines = [f"held-out accuracy ({questions} questions; micro pools them, macro averages the tasks; each method at "
             f"its chosen lr, seed {seed}):",
             f"{'':<16}{'lr':>8}{'trainable':>11}{'micro':>8}{'macro':>8}{'m.norm':>8}{'gold ll':>9}{'s/step':>8}"
             + "".join(f"{t[:8]:>9}" for t in tasks)]

    def row(name: str, run: dict[str, Any], lr: str, trainable: str, step: str) -> str:
        return (f"{name:<16}{lr:>8}{trainable:>11}{run['test_acc']:>8.4f}{run['test_macro_acc']:>8.4f}"
                f"{run['test_acc_norm']:>8.4f}{run['test_gold_loglik']:>9.3f}{step:>8}" + _task_cells(run, tasks))

    lines += [row("dense", dense, "-", "-", "-"), row("pruned", pruned, "-", "-", "-")]
    for name, run in best.items():
        lines.append(f"{name:<16}  every learning rate failed" if run is None else
                     row(name, run, f"{run['lr']:.0e}", f"{run['trainable']:,}", f"{run['step_time_s']:.2f}"))
    lines.append(f"{'chance':<16}{'':>60}" + "".join(f"{pruned['chance'][t]:>9.3f}" for t in tasks))
    return lines


def format_task_seeds(best: dict[str, dict | None], tasks: list[str], seed: int) -> list[str]:
    """Mean +- sample sd over seeds of micro and macro accuracy and of each task's accuracy."""
    lines = []
    for name, run in best.items():
        if not run:
            continue
        runs = seed_runs(run, seed)
        failed = [e["seed"] for e in run.get("seeds", []) if e["seed"] not in runs]
        cells = [mean_sd([r[key] for r in runs.values()]) for key in ("test_acc", "test_macro_acc")]
        cells += [mean_sd([r["acc"][t] for r in runs.values()]) for t in tasks]
        lines.append(f"  {name:<16}{','.join(map(str, runs)):>8}" + "".join(f"{m:>9.4f}±{sd:.4f}" for m, sd in cells)
                     + (f"  failed seeds: {', '.join(map(str, failed))}" if failed else ""))
    return ["", "over seeds (held-out accuracy at each method's chosen lr: mean ± sample sd):",
            f"  {'method':<16}{'seeds':>8}" + "".join(f"{name[:15]:>16}" for name in ("micro", "macro", *tasks)),
            *lines]


def format_paired(best: dict[str, dict | None], tasks: list[str], seed: int, subset: str = "") -> list[str]:
    """SEFT minus each method in micro accuracy over ``tasks``, question by question, with its bootstrap 95%
    interval (``subset`` says which tasks when not all)."""
    reference = best.get(PAIRED_REFERENCE)
    if not reference:
        return []
    ref_runs = seed_runs(reference, seed)
    lines = ["", f"paired difference in held-out micro accuracy, {PAIRED_REFERENCE} minus each method: each "
             "question's 0/1 outcome averaged over the seeds both have; 95% interval by paired bootstrap over the "
             f"questions (resampled within each task, the same resample for both methods, {BOOTSTRAP_RESAMPLES} "
             "resamples, seeded)" + (f"; {subset}:" if subset else ":")]
    for name, run in best.items():
        if name == PAIRED_REFERENCE or not run:
            continue
        paired = paired_bootstrap(seed_runs(run, seed), ref_runs, tasks)
        if paired is None:
            lines.append(f"  {name:<16}no shared seed with per-question outcomes")
            continue
        verdict = (f"{PAIRED_REFERENCE} better" if paired["low"] > 0 else f"{name} better" if paired["high"] < 0
                   else "no difference at 95%")
        lines.append(f"  {name:<16}{paired['diff']:+.4f}  [{paired['low']:+.4f}, {paired['high']:+.4f}]  "
                     f"seeds {','.join(map(str, paired['seeds']))}  {verdict}")
    return lines


def gains_over_pruned(dense: dict, pruned: dict, best: dict[str, dict | None], subsets: dict[str, list[str]],
                      seed: int) -> dict[str, dict[str, dict[str, Any] | None]]:
    """Per row (the dense model, then each method) and subset of tasks: the row minus the pruned model in micro
    accuracy, question by question, with its paired bootstrap interval (None without per-question outcomes).
    The pruned model is deterministic, so it pairs with every seed of a method."""
    rows = {"dense": {seed: dense}, **{m: seed_runs(r, seed) for m, r in best.items() if r}}
    return {name: {subset: paired_bootstrap({s: pruned for s in runs}, runs, tasks)
                   for subset, tasks in subsets.items()} for name, runs in rows.items()}


def format_gain_over_pruned(dense: dict, pruned: dict, best: dict[str, dict | None], subsets: dict[str, list[str]],
                            seed: int) -> list[str]:
    """The gains over the pruned model as a table; the dense model's row is the gap a repair could close."""
    lines = ["", "gain over the pruned model in held-out micro accuracy (the same paired bootstrap; * the 95% interval "
             "excludes 0):", f"  {'':<16}" + "".join(f"{name:>33}" for name in subsets)]
    for name, row in gains_over_pruned(dense, pruned, best, subsets, seed).items():
        cells = [f"{'no per-question outcomes':>33}" if gain is None else
                 f"{gain['diff']:>+13.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]"
                 + ("*" if gain["low"] > 0 or gain["high"] < 0 else " ") for gain in row.values()]
        lines.append(f"  {name:<16}" + "".join(cells))
    return lines


def chance_margins(dense: dict, pruned: dict, best: dict[str, dict | None], tasks: list[str], seed: int
                   ) -> dict[str, dict[str, tuple[float, float]]]:
    """Per row (dense, pruned, then each method's mean over seeds) and task: accuracy minus chance and that
    accuracy's standard error."""
    rows = {"dense": dense["acc"], "pruned": pruned["acc"]}
    for name, run in best.items():
        if run:
            runs = list(seed_runs(run, seed).values())
            rows[name] = {t: sum(r["acc"][t] for r in runs) / len(runs) for t in tasks}
    return {name: {t: margin_over_chance(accs[t], pruned["chance"][t], pruned["n"][t]) for t in tasks}
            for name, accs in rows.items()}


def format_chance_margins(dense: dict, pruned: dict, best: dict[str, dict | None], tasks: list[str], seed: int
                          ) -> list[str]:
    """The margins over chance as a table; ``*`` marks a margin above two standard errors of that accuracy, the
    tasks a verdict can rest on."""
    lines = ["", "margin over chance (accuracy minus chance; * above two standard errors):",
             f"  {'':<16}" + "".join(f"{t[:8]:>9}" for t in tasks)]
    for name, row in chance_margins(dense, pruned, best, tasks, seed).items():
        lines.append(f"  {name:<16}" + "".join(f"{margin:>+8.3f}{'*' if margin > 2 * se else ' '}"
                                              for margin, se in row.values()))
    return lines
