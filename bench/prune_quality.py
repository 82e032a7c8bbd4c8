"""Held-out perplexity and pruning time of magnitude, Wanda and SparseGPT on the default model.

    python -m seftkit.bench.prune_quality [--model smollm2-135m] [--patterns 0.5,0.7,2:4]
        [--methods magnitude,wanda,sparsegpt] [--nsamples 32] [--seqlen 512] [--max-windows N] [--threads T] [--json P]

Protocol (every number comes from this one run): one set of ``nsamples`` x ``seqlen`` calibration windows of
``olmo:lambada:train`` (seed 0) serves every method; each pruned model starts from a fresh load of the dense one;
perplexity is :func:`seftkit.eval.perplexity` on ``olmo:lambada:heldout`` in non-overlapping 512-token windows
(the Wanda/SparseGPT protocol). ``prune s`` is ``prune_model``'s wall time (calibration forwards included,
loading excluded) on this machine as it was during the run: on a shared machine, it varies with the load.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

import torch

from seftkit.data import DEFAULT_HELDOUT_TEXT, DEFAULT_TRAIN_TEXT, load_texts
from seftkit.eval import perplexity
from seftkit.io import write_json
from seftkit.models import DEFAULT_MODEL, load_model
from seftkit.prune import calibration_windows, prune_model
from seftkit.prune.registry import PRUNERS
from seftkit.sparsity.pattern import SparsityPattern, parse_pattern

PPL_SEQLEN = 512


@dataclass
class Row:
    method: str
    pattern: str
    ppl: float
    ppl_vs_dense: float
    prune_s: float | None
    peak_rss_mb: float | None
    sparsity: float


def parse_patterns(text: str) -> list[SparsityPattern]:
    return [parse_pattern(nm=p) if ":" in p else parse_pattern(float(p)) for p in text.split(",") if p]


def run(model_spec: str, methods: list[str], patterns: list[SparsityPattern], nsamples: int, seqlen: int,
        max_windows: int | None) -> list[Row]:
    heldout = load_texts(DEFAULT_HELDOUT_TEXT)
    model, tokenizer = load_model(model_spec)
    windows = calibration_windows(model, tokenizer, load_texts(DEFAULT_TRAIN_TEXT), nsamples, seqlen, seed=0)

    def ppl(m: torch.nn.Module) -> float:
        return perplexity(m, tokenizer, heldout, seqlen=PPL_SEQLEN, max_windows=max_windows, progress=False).ppl

    dense = ppl(model)
    rows = [Row("dense", "-", dense, 1.0, None, None, 0.0)]
    print(f"dense: ppl {dense:.2f}", flush=True)
    for pattern in patterns:
        for method in methods:
            model, _ = load_model(model_spec)
            report = prune_model(model, tokenizer, method, pattern, windows)
            value = ppl(model)
            rows.append(Row(method, pattern.describe(), value, value / dense, report.wall_time_s, report.peak_rss_mb,
                            report.overall_sparsity))
            print(f"{method} {pattern.describe()}: ppl {value:.2f} in {report.wall_time_s:.0f} s", flush=True)
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [f"{'method':<10} {'pattern':<17} {'sparsity':>8} {'ppl':>10} {'x dense':>8} {'prune s':>8} {'RSS MiB':>8}"]
    for r in rows:
        ppl = f"{r.ppl:.2f}" if math.isfinite(r.ppl) else "inf"
        secs = f"{r.prune_s:.1f}" if r.prune_s is not None else "-"
        rss = f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb is not None else "-"
        lines.append(f"{r.method:<10} {r.pattern:<17} {r.sparsity:>8.2%} {ppl:>10} {r.ppl_vs_dense:>8.2f} "
                     f"{secs:>8} {rss:>8}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--methods", default=",".join(PRUNERS))
    parser.add_argument("--patterns", default="0.5,0.7,2:4", help="Comma-separated sparsities and N:M patterns.")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, help="Limit the held-out perplexity windows (faster, noisier).")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--json", help="Also write the rows to this JSON file.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(PRUNERS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(PRUNERS)}")
    rows = run(args.model, methods, parse_patterns(args.patterns), args.nsamples, args.seqlen, args.max_windows)
    print(f"\n{args.model}, calibration {args.nsamples} x {args.seqlen} tokens, torch threads "
          f"{torch.get_num_threads()} of {os.cpu_count()} CPUs")
    print(format_table(rows))
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
