"""Pictures of reports: what a repair run did and how sparse a verified model is, as PNG files.

Drawn from the JSON form of a report (what ``--json`` writes), so ``seftkit plot REPORT.json`` redraws exactly
what ``repair`` drew. matplotlib is optional (``pip install "seftkit[plot]"``); figures are rendered with the
Agg canvas directly, without pyplot, so drawing never touches a caller's matplotlib backend or global state.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from seftkit.errors import SeftkitError
from seftkit.io import atomic_file
from seftkit.sparsity.targets import layer_index

log = logging.getLogger(__name__)

MISSING_MATPLOTLIB = 'drawing needs matplotlib: pip install "seftkit[plot]" (or pip install matplotlib)'
# Figure sizes in inches at DPI: the PNGs are REPAIR_SIZE x DPI and VERIFY_SIZE x DPI pixels.
DPI = 100
REPAIR_SIZE = (13.0, 8.5)
VERIFY_SIZE = (12.0, 5.5)
# Topology counts per SEFT boundary, as stored in each event -> legend label.
UPDATE_COUNTS = {
    "dropped": "dropped (slots freed)",
    "grown": "grown (slots placed)",
    "revived": "revived (pruned weights back)",
    "removed_by_sensitivity": "evicted (active weights given up)",
}


def report_kind(report: Any) -> str:
    """``"repair"`` or ``"verify"``; anything else is bad input with a message naming what it looks like."""
    if isinstance(report, dict) and {"loss_curve", "config", "method"} <= report.keys():
        return "repair"
    if isinstance(report, dict) and {"thresholds", "tensors", "per_layer"} <= report.keys():
        return "verify"
    keys = ", ".join(sorted(report)[:6]) if isinstance(report, dict) else type(report).__name__
    raise SeftkitError(f"can only draw repair and verify reports (--json of seftkit repair / verify); this one has "
                       f"{keys}")


def plot_report(report: dict[str, Any], out: str | os.PathLike) -> Path:
    """Draw a repair or verify report (its JSON form) to the PNG ``out``; returns the path written."""
    check_plot_path(out)
    kind = report_kind(report)
    draw = {"repair": draw_repair, "verify": draw_verify}[kind]
    try:
        figure = draw(report)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a hand-edited or truncated report
        raise SeftkitError(f"malformed {kind} report: {type(exc).__name__}: {exc}") from None
    return save_png(figure, out)


def png_beside(json_path: str | os.PathLike) -> Path:
    """``r.json`` -> ``r.png`` (never the report itself)."""
    path = Path(json_path)
    return path.with_name(path.name + ".png") if path.suffix.lower() == ".png" else path.with_suffix(".png")


def plot_beside(json_path: str | os.PathLike) -> Path | None:
    """Draw the report just written to ``json_path`` next to it; without matplotlib, warn and draw nothing."""
    try:
        check_plot_path(png_beside(json_path))
    except SeftkitError as exc:
        log.warning("warning: no picture of %s: %s", json_path, exc)
        return None
    return plot_report(json.loads(Path(json_path).read_text()), png_beside(json_path))


def check_plot_path(out: str | os.PathLike) -> None:
    """Fail before any work when the picture cannot be drawn (no matplotlib, not a .png name)."""
    if Path(out).suffix.lower() != ".png":
        raise SeftkitError(f"{out}: the picture is a PNG; name it *.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SeftkitError(MISSING_MATPLOTLIB) from None


def new_figure(size: tuple[float, float]) -> Any:
    """An empty figure of ``size`` inches on its own Agg canvas (pyplot's global state untouched)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise SeftkitError(MISSING_MATPLOTLIB) from None
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Any, out: str | os.PathLike) -> Path:
    """Write the figure atomically (a reader never sees half a PNG), at exactly its size in pixels."""
    with atomic_file(out) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return Path(out)


# -- repair ------------------------------------------------------------------------------------------------


def draw_repair(report: dict[str, Any]) -> Any:
    """Loss and learning rate per step, topology changes per SEFT boundary, revived weights per layer."""
    figure = new_figure(REPAIR_SIZE)
    figure.suptitle(_repair_title(report), fontsize=12)
    loss_ax, lr_ax, updates_ax, layers_ax = figure.subplots(2, 2).flat
    steps = [int(step) for step, _ in report["loss_curve"]]
    boundaries = [int(event["step"]) for event in report.get("events", [])]
    _loss_panel(loss_ax, steps, [float(loss) for _, loss in report["loss_curve"]], boundaries)
    _lr_panel(lr_ax, report["config"], steps)
    _updates_panel(updates_ax, report)
    _revived_panel(layers_ax, report)
    return figure


def _repair_title(report: dict[str, Any]) -> str:
    before, after = report.get("sparsity_before"), report.get("sparsity_after")
    sparsity = f"sparsity {before:.2%} -> {after:.2%}" if after is not None else f"sparsity {before:.2%}"
    title = f"seftkit repair: {report['method']}, {report.get('steps_done', len(report['loss_curve']))} steps, " \
            f"{report.get('trainable_params', 0):,} trainable parameters, {sparsity}"
    evals = [f"{key} {report['eval_before'][key]:.4g} -> {value:.4g}" for key, value in
             report.get("eval_after", {}).items() if report.get("eval_before", {}).get(key) is not None]
    return title + ("\n" + ", ".join(evals) if evals else "")


def _empty(ax: Any, title: str, message: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _loss_panel(ax: Any, steps: list[int], losses: list[float], boundaries: list[int]) -> None:
    if not steps:
        _empty(ax, "Training loss", "no steps run")
        return
    window = max(1, len(steps) // 20)
    ax.plot(steps, losses, color="tab:blue", linewidth=1, alpha=0.45 if window > 1 else 1.0, label="per step")
    if window > 1:  # a running mean makes the trend readable through per-batch noise
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"mean of last {window}")
    for i, step in enumerate(boundaries):
        ax.axvline(step, color="grey", linestyle=":", linewidth=1, label="SEFT topology update" if i == 0 else None)
    ax.set_title("Training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)


def _lr_panel(ax: Any, config: dict[str, Any], steps: list[int]) -> None:
    from seftkit.repair.trainer import learning_rate  # the schedule the run used, not a copy of it

    if not steps:
        _empty(ax, "Learning rate", "no steps run")
        return
    schedule = SimpleNamespace(**config)
    ax.plot(steps, [learning_rate(schedule, step) for step in steps], color="tab:orange")
    ax.set_title(f"Learning rate (peak {config['lr']:g}, {config.get('warmup_steps', 0)} warm-up steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_ylim(bottom=0)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(alpha=0.3)


def _updates_panel(ax: Any, report: dict[str, Any]) -> None:
    events = report.get("events", [])
    title = "Topology changes at each SEFT update (all layers)"
    if not events:
        _empty(ax, title, f"no topology updates: {report['method']} trains a fixed set of weights")
        return
    width = 0.8 / len(UPDATE_COUNTS)
    positions = range(len(events))
    for i, (key, label) in enumerate(UPDATE_COUNTS.items()):
        ax.bar([p + (i - (len(UPDATE_COUNTS) - 1) / 2) * width for p in positions],
               [int(event.get(key, 0)) for event in events], width, label=label)
    ax.set_xticks(list(positions), [str(event["step"]) for event in events])
    ax.set_title(title)
    ax.set_xlabel("update at optimizer step")
    ax.set_ylabel("weights")
    ax.yaxis.set_major_formatter("{x:,.0f}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _revived_panel(ax: Any, report: dict[str, Any]) -> None:
    title = "Pruned weights revived, per decoder layer"
    summary = report.get("method_summary", {})
    layers = summary.get("layers", {})
    counts = {name: entry["revived"] for name, entry in layers.items() if "revived" in entry}
    if not counts:
        _empty(ax, title, f"{report['method']} reports no per-layer revivals")
        return
    if not summary.get("revive", True):
        _empty(ax, title, "none: this run grew only inside the active set (no revival)")
        return
    # one bar per decoder layer, stacked by projection (q_proj, up_proj, ...) so hot spots show
    by_block: dict[str, dict[int | None, int]] = defaultdict(dict)
    for name, count in counts.items():
        by_block[name.rsplit(".", 1)[-1]][layer_index(name)] = count
    blocks = sorted({b for per in by_block.values() for b in per}, key=lambda b: (b is None, b or 0))
    labels = ["other" if b is None else str(b) for b in blocks]
    bottom = [0] * len(blocks)
    for kind, per in sorted(by_block.items()):
        heights = [per.get(b, 0) for b in blocks]
        ax.bar(range(len(blocks)), heights, bottom=bottom, label=kind)
        bottom = [a + b for a, b in zip(bottom, heights, strict=True)]
    ax.set_xticks(range(len(blocks)), labels, fontsize=8 if len(blocks) <= 32 else 6)
    ax.set_title(f"{title} ({sum(counts.values()):,} in all)")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("revived weights")
    ax.yaxis.set_major_formatter("{x:,.0f}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them


# -- verify ------------------------------------------------------------------------------------------------


def draw_verify(report: dict[str, Any]) -> Any:
    """Per-layer sparsity (bars) with every weight as a dot (red when it fails), against the target line."""
    figure = new_figure(VERIFY_SIZE)
    ax = figure.subplots()
    per_layer = {int(index): totals for index, totals in report["per_layer"].items()}
    tensors = report["tensors"]
    indices = sorted(per_layer)
    if not tensors:
        _empty(ax, "Sparsity per decoder layer", "no weights in this report")
        return figure
    ax.bar(indices, [per_layer[i]["sparsity"] for i in indices], color="tab:blue", alpha=0.35,
           label="layer (all its weights)")
    kinds = sorted({t["name"].rsplit(".", 1)[0].rsplit(".", 1)[-1] for t in tensors})
    passed, failed = ([], []), ([], [])
    for tensor in tensors:
        index = layer_index(tensor["name"])
        x = (max(indices, default=-1) + 1 if index is None else index)
        kind = tensor["name"].rsplit(".", 1)[0].rsplit(".", 1)[-1]
        x += (kinds.index(kind) - (len(kinds) - 1) / 2) * 0.6 / max(len(kinds), 1)
        bucket = passed if tensor["passed"] else failed
        bucket[0].append(x)
        bucket[1].append(tensor["sparsity"])
    if passed[0]:
        ax.scatter(*passed, s=10, color="tab:green", label="weight meets the bar", zorder=3)
    if failed[0]:
        ax.scatter(*failed, s=18, color="tab:red", marker="x", label="weight falls short", zorder=4)
    _target_lines(ax, report["thresholds"])
    ticks = indices + ([max(indices, default=-1) + 1] if any(layer_index(t["name"]) is None for t in tensors) else [])
    ax.set_xticks(ticks, [str(i) if i in per_layer else "other" for i in ticks],
                  fontsize=8 if len(ticks) <= 32 else 6)
    ax.set_title(_verify_title(report))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("fraction of weights that are zero")
    ax.yaxis.set_major_formatter("{x:.0%}")
    ax.set_ylim(0, 1.02)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return figure


def _target_lines(ax: Any, thresholds: dict[str, Any]) -> None:
    if thresholds.get("nm"):
        n, m = (int(part) for part in thresholds["nm"].split(":"))
        ax.axhline(n / m, color="black", linestyle="--", linewidth=1,
                   label=f"N:M {thresholds['nm']} (every group of {m} holds {n} zeros)")
    elif thresholds.get("sparsity") is not None:
        target, tol = thresholds["sparsity"], thresholds.get("tol", 0.0)
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:.1%}")
        if tol:
            ax.axhline(target - tol, color="black", linestyle=":", linewidth=1, label=f"bar: target - tol {tol:g}")


def _verify_title(report: dict[str, Any]) -> str:
    tensors = report["tensors"]
    totals = report.get("global") or report.get("overall") or {}
    head = f"seftkit verify: {Path(str(report['model'])).name or report['model']}, " \
           f"{totals.get('sparsity', 0):.2%} zeros over {len(tensors)} weights"
    th = report["thresholds"]
    if not th.get("nm") and th.get("sparsity") is None:
        return head + " (measured only: no target)"
    failed = sum(not t["passed"] for t in tensors)
    return head + (f" - FAIL: {failed} of {len(tensors)} weights miss the bar" if failed else " - PASS")
