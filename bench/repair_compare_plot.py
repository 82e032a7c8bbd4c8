"""The repair bench's task comparison as a picture (``--combine ... --plot P.png``): each method's gain over the
pruned model with its paired 95% interval, on all tasks and on the tasks the dense model answers above chance, and
beside it every task's accuracy minus chance. The same numbers as the printed table (repair_compare_table)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

from seftkit.bench.repair_compare_results import ADDED_SETTINGS, pick_best, seed_runs
from seftkit.bench.repair_compare_table import SKILL_SUBSET, chance_margins, gains_over_pruned, task_subsets
from seftkit.plot import new_figure, save_png

# Inches at seftkit.plot.DPI: the PNG is SIZE x DPI pixels.
SIZE = (14.0, 5.5)
SUBSET_COLORS = ("tab:blue", "tab:orange")
REFERENCE_COLORS = {"pruned": "0.65", "dense": "0.2"}
# Methods avoid the subset colours (C0, C1) and the grey C7 that would read as a reference model.
METHOD_COLORS = ("C2", "C3", "C4", "C5", "C6", "C8", "C9")


def draw_task_comparison(saved: dict[str, Any]) -> Any:
    """The figure of a combined task-mode result (what ``combined_results`` returns)."""
    dense, pruned, args = saved["dense"], saved["pruned"], saved["args"]
    seed = int(args["seed"])
    best = {method: pick_best(runs, args.get("select", "acc")) for method, runs in saved["sweep"].items()}
    tasks = list(pruned["acc"])
    subsets = task_subsets(dense, tasks)
    figure = new_figure(SIZE)
    gain_ax, margin_ax = figure.subplots(1, 2, width_ratios=(2, 3))
    _gain_panel(gain_ax, gains_over_pruned(dense, pruned, best, subsets, seed),
                {name: seed_runs(run, seed) for name, run in best.items() if run})
    _margin_panel(margin_ax, chance_margins(dense, pruned, best, tasks, seed), subsets)
    variants = "".join(f"\nSEFT {tag}: {changed}" for tag, changed in saved["variants"].items())
    pruner = args.get("prune_method", ADDED_SETTINGS["prune_method"])
    figure.suptitle(f"{args['model']}, {pruner} {float(args['sparsity']):.0%}: repair on "
                    f"{sum(pruned['n'].values()):,} held-out questions of {len(tasks)} tasks" + variants)
    return figure


def plot_task_comparison(saved: dict[str, Any], out: str | os.PathLike) -> Path:
    return save_png(draw_task_comparison(saved), out)


def _gain_panel(ax: Any, gains: dict[str, dict[str, dict[str, Any] | None]],
                runs: dict[str, dict[int, dict[str, Any]]]) -> None:
    names = list(gains)  # dense first, then the methods in the table's order
    subsets = list(gains[names[0]])
    for i, subset in enumerate(subsets):  # at most two: all tasks, the dense model's skill tasks
        label = subset
        for row, name in enumerate(names):
            gain = gains[name][subset]
            if gain is None:  # no per-question outcomes: named in the tick label
                continue
            ax.errorbar(gain["diff"], row + (i - (len(subsets) - 1) / 2) * 0.3,
                        xerr=[[gain["diff"] - gain["low"]], [gain["high"] - gain["diff"]]],
                        fmt="o", color=SUBSET_COLORS[i], capsize=3, label=label)
            label = None
    ax.set_yticks(range(len(names)), [_gain_label(name, runs.get(name), gains[name]) for name in names])
    ax.invert_yaxis()
    ax.axvline(0, color="0.3", linewidth=0.8)
    ax.set_xlabel("gain over the pruned model, held-out micro accuracy\n(paired bootstrap 95% interval)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    ax.grid(axis="x", alpha=0.3)


def _gain_label(name: str, runs: dict[int, dict[str, Any]] | None, gains: dict[str, dict[str, Any] | None]) -> str:
    if runs is None:
        return name
    lr = next(iter(runs.values()))["lr"]
    missing = "; no per-question outcomes" if None in gains.values() else ""
    return f"{name}\n(lr {lr:.0e}, {len(runs)} seed{'s' if len(runs) != 1 else ''}{missing})"


def _margin_panel(ax: Any, margins: dict[str, dict[str, tuple[float, float]]], subsets: dict[str, list[str]]
                  ) -> None:
    rows = list(margins)
    tasks = list(margins["pruned"])
    skilled = subsets.get(SKILL_SUBSET, [])  # present only when the dense model's skill is on some tasks, not all
    width = 0.8 / len(rows)
    method_colors = itertools.cycle(METHOD_COLORS)
    for i, name in enumerate(rows):
        values = [margins[name][t][0] for t in tasks]
        errors = [2 * margins[name][t][1] for t in tasks]
        ax.bar([x + (i - (len(rows) - 1) / 2) * width for x in range(len(tasks))], values, width, yerr=errors,
               color=REFERENCE_COLORS.get(name) or next(method_colors), label=name, error_kw={"linewidth": 0.6})
    ax.set_xticks(range(len(tasks)), [f"{t}*" if t in skilled else t for t in tasks], rotation=20)
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_ylabel("accuracy minus chance (methods: mean over seeds)")
    ax.set_title("per task, +-2 standard errors" + (" (* the dense model is above chance)" if skilled else ""),
                 fontsize="medium")
    ax.legend(fontsize="small", ncols=2)
    ax.grid(axis="y", alpha=0.3)
