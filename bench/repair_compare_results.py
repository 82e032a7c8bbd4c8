"""Saved results of the repair bench: saving as runs finish, reusing runs (``--reuse``), merging parts of one
protocol (``--combine``), picking each method's learning rate, and the statistics over seeds and questions.

A result file is ``{"args", "dense", "pruned", "sweep"}``; ``sweep[method]`` lists one run per learning rate (at
``--seed``), and the run at the chosen rate carries the extra seeds' runs in ``"seeds"``.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from seftkit.repair.registry import baseline_methods

SHARED_SETTINGS = ("model", "sparsity", "calib_samples", "steps", "batch_size", "seqlen", "lora_rank_equivalent",
                   "warmup_steps", "max_grad_norm", "gradient_checkpointing", "eval_seqlen", "eval_windows",
                   "eval_tasks", "eval_limit", "seed", "data", "max_per_task", "val_limit", "prune_method", "device")
"""Everything a baseline's numbers depend on (the SEFT knobs are not among them)."""
DENSE_SETTINGS = ("model", "eval_seqlen", "eval_windows", "eval_tasks", "eval_limit", "data", "device")
"""What the dense model's scores depend on: a part at another sparsity or pruner reuses them."""
ADDED_SETTINGS = {"warmup_steps": "0", "max_grad_norm": "None", "data": "olmo:lambada:train", "max_per_task": "None",
                  "val_limit": "None", "prune_method": "wanda", "device": "cpu"}
"""Shared settings newer than some earlier results: a result without one was run at this value."""
SEFT_SETTINGS = ("update_interval", "accumulation_steps", "drop_rate", "init", "seft_option")
"""The bench's SEFT-only settings: a saved SEFT run is reused only when they are the same, and ``--combine`` shows
the SEFT methods of a file where they differ as a variant of the first file's."""
COMBINE_FREE = ("methods", "lrs", "extra_seeds", "json", "reuse", "workdir", "worker", "result", "combine",
                "no_memory", "eval_batch_size", "score_val")
"""Arguments that may differ between the saved results ``--combine`` prints as one comparison."""
PAIRED_REFERENCE = "seft"
"""Every method is compared with SEFT seed by seed: a seed fixes the data order for every method, so the paired
difference is free of the part of the spread that the data order causes for all."""
BOOTSTRAP_RESAMPLES = 2000


def save_results(path: Path, args: argparse.Namespace, dense: dict | None, pruned: dict | None,
                 sweep: dict[str, list[dict[str, Any]]]) -> None:
    """Write the results so far, atomically (a sweep that dies keeps every finished run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "dense": dense,
                               "pruned": pruned, "sweep": sweep}, indent=1))
    tmp.replace(path)


def read_result(path: Path, flag: str) -> dict[str, Any]:
    """A saved ``--json`` result; ValueError (one line) when it is not one."""
    try:
        result = json.loads(path.read_text())
        if not isinstance(result["args"], dict) or not isinstance(result["sweep"], dict):
            raise TypeError("its args and sweep are not objects")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{flag} {path}: not a readable repair_compare --json result ({exc})") from None
    return result


def reusable_runs(path: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    """The earlier result at ``path`` when its shared settings equal ``args``'; only its dense scores when just
    the pruning or training settings differ; {} without a path. ValueError (one line) for an unreadable file or
    other settings."""
    if path is None:
        return {}
    earlier = read_result(path, "--reuse")
    recorded = earlier["args"]
    differing = [key for key in SHARED_SETTINGS
                 if recorded.get(key, ADDED_SETTINGS.get(key)) != str(getattr(args, key))]
    if not differing:
        return earlier
    why = f"--reuse {path}: its settings differ in {', '.join(differing)}"
    if earlier.get("dense") is None or any(key in DENSE_SETTINGS for key in differing):
        raise ValueError(f"{why}; nothing can be reused")
    print(f"{why}; only the dense model's scores are reused", file=sys.stderr, flush=True)
    return {"dense": earlier["dense"]}


def may_reuse(method: str, run: dict[str, Any], code: str | None) -> bool:
    """A baseline's run always (nothing of SEFT's code or settings reaches it); a SEFT run only when it was made
    by the same code (``code``: see ``code_fingerprint``); never a failed run."""
    return "error" not in run and (method in baseline_methods() or (code is not None and run.get("code") == code))


def reused_run(earlier: dict[str, Any], method: str, lr: float, code: str | None = None, needs_val: bool = False
               ) -> dict[str, Any] | None:
    """A run at ``lr`` from the earlier result (its memory run and extra seeds dropped: memory is measured anew,
    seeds are looked up one by one with :func:`reused_seed_run`); with ``needs_val`` (a sweep that picks its rate)
    only one that was scored on val."""
    for run in earlier.get("sweep", {}).get(method, []):
        if run["lr"] == lr and may_reuse(method, run, code) and (scored_on_val(run) or not needs_val):
            return {**{k: v for k, v in run.items() if k not in ("memory", "seeds")}, "reused": True}
    return None


def reused_seed_run(earlier: dict[str, Any], method: str, lr: float, seed: int, code: str | None = None
                    ) -> dict[str, Any] | None:
    """An extra-seed run at ``lr`` and ``seed`` from the earlier result, if it has one that may be reused."""
    for run in earlier.get("sweep", {}).get(method, []):
        for extra in run.get("seeds", []) if run["lr"] == lr else []:
            if extra["seed"] == seed and may_reuse(method, extra, code):
                return {**extra, "reused": True}
    return None


def _rank(run: dict[str, Any]) -> int:
    """Which of two copies of a run ``--combine`` keeps: a measured one over a reused one over a failed one."""
    return 0 if "error" in run else 1 if run.get("reused") else 2


def _keep_one(mine: dict[str, Any], theirs: dict[str, Any], what: str, path: Path) -> dict[str, Any]:
    if _rank(mine) == _rank(theirs) == 2:
        raise ValueError(f"--combine {path}: {what} is in two of the files")
    return theirs if _rank(theirs) > _rank(mine) else mine


def _merge_runs(method: str, mine: list[dict[str, Any]], theirs: list[dict[str, Any]], path: Path) -> None:
    """Add ``theirs`` to ``mine`` by learning rate and, within the chosen one, by seed."""
    for run in theirs:
        index = next((i for i, r in enumerate(mine) if r["lr"] == run["lr"]), None)
        if index is None:
            mine.append(run)
            continue
        kept = _keep_one(mine[index], run, f"{method} (lr {run['lr']:g})", path)
        seeds: dict[int, dict[str, Any]] = {}
        for extra in [*mine[index].get("seeds", []), *run.get("seeds", [])]:
            seed = extra["seed"]
            seeds[seed] = (_keep_one(seeds[seed], extra, f"{method} seed {seed}", path) if seed in seeds
                           else extra)
        mine[index] = {**kept, **({"seeds": sorted(seeds.values(), key=lambda e: e["seed"])} if seeds else {})}


def variant_settings(first: dict[str, str], other: dict[str, str]) -> tuple[str, ...]:
    """``key=value`` for each SEFT setting in which ``other`` differs from ``first`` (the options spelt out)."""
    changed = []
    for key in SEFT_SETTINGS:
        if first.get(key) != other.get(key):
            value = other.get(key)
            if key == "seft_option" and value is not None:
                changed += ast.literal_eval(value) or ["no --seft-option"]
            else:
                changed.append(f"{key}={value}")
    return tuple(changed)


def combined_results(paths: list[Path]) -> dict[str, Any]:
    """Saved ``--json`` results of one protocol run in parts (a method, a learning rate or a seed at a time), as
    one (the first file's dense and pruned runs). A file whose SEFT settings differ adds its SEFT methods as
    variants (``seft v1``: explained in ``"variants"``), so that an evolution option pairs with the first file's
    SEFT. ValueError (one line) for unreadable files, other settings, or a run measured in two files."""
    if not paths:
        raise ValueError("--combine needs at least one --json result")
    results = [read_result(path, "--combine") for path in paths]
    first, sweep, variants = results[0], {}, {}
    for path, result in zip(paths, results, strict=True):
        keys = (set(first["args"]) | set(result["args"])) - set(COMBINE_FREE) - set(SEFT_SETTINGS)
        differing = sorted(k for k in keys if first["args"].get(k, ADDED_SETTINGS.get(k))
                           != result["args"].get(k, ADDED_SETTINGS.get(k)))
        if differing:
            raise ValueError(f"--combine {path}: its settings differ from {paths[0]}'s in {', '.join(differing)}")
        changed = variant_settings(first["args"], result["args"])
        tag = variants.setdefault(changed, f"v{len(variants) + 1}") if changed else None
        for method, runs in result["sweep"].items():
            name = f"{method} {tag}" if tag and method not in baseline_methods() else method
            _merge_runs(name, sweep.setdefault(name, []), json.loads(json.dumps(runs)), path)
    for method, runs in sweep.items():
        finished = [r for r in runs if "error" not in r]  # a failed rate is never picked: it needs no val score
        unscored = [f"{r['lr']:g}" for r in finished if not scored_on_val(r)]
        if unscored and len(finished) > 1:
            raise ValueError(f"--combine: {method} has runs at {len(finished)} rates but those at "
                             f"{', '.join(unscored)} were not scored on val, so no rate can be picked (run a rate "
                             "alone with --score-val)")
    dense = next((r["dense"] for r in results if r.get("dense")), None)
    pruned = next((r["pruned"] for r in results if r.get("pruned")), None)
    return {"args": first["args"], "dense": dense, "pruned": pruned, "sweep": sweep,
            "variants": {tag: ", ".join(changed) for changed, tag in variants.items()}}


def selection_key(run: dict[str, Any], select: str) -> tuple[float, ...]:
    """What picks the learning rate, higher is better: -val ppl (text), val micro accuracy with the gold-answer
    log-likelihood breaking ties (``acc``), or that log-likelihood alone (``loglik``); nothing when the run
    was not scored on val (a single learning rate: there is nothing to choose)."""
    if "val_acc" not in run:
        return (-run["val_ppl"],) if "val_ppl" in run else ()
    if select == "loglik":
        return (run["val_gold_loglik"],)
    return run["val_acc"], run["val_gold_loglik"]


def scored_on_val(run: dict[str, Any]) -> bool:
    return bool(selection_key(run, "acc"))


def pick_best(runs: list[dict[str, Any]], select: str = "acc") -> dict[str, Any] | None:
    ok = [r for r in runs if "error" not in r and all(math.isfinite(v) for v in selection_key(r, select))]
    return max(ok, key=lambda r: selection_key(r, select)) if ok else None


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


def seed_runs(run: dict[str, Any], seed: int) -> dict[int, dict[str, Any]]:
    """A method's chosen run (at ``seed``) and its extra-seed runs that succeeded, by seed."""
    runs = {seed: run}
    for extra in run.get("seeds", []):
        if "error" not in extra and math.isfinite(extra.get("test_acc", extra.get("test_ppl", math.nan))):
            runs[extra["seed"]] = extra
    return runs


def paired_bootstrap(method: dict[int, dict[str, Any]], reference: dict[int, dict[str, Any]], tasks: list[str],
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any] | None:
    """Reference minus method in micro accuracy over the held-out questions, with a 95% interval.

    Each question's outcome is averaged over the seeds both have, the per-question differences are resampled
    with replacement within each task (so every resample keeps the task sizes that micro accuracy weighs by),
    and the interval is the 2.5th-97.5th percentile of the resampled mean differences; None without a shared
    seed with per-question outcomes.
    """
    import numpy as np

    seeds = sorted(s for s in set(method) & set(reference)
                   if all(t in method[s].get("correct", {}) and t in reference[s].get("correct", {}) for t in tasks))
    if not seeds:
        return None
    rng = np.random.default_rng(seed)
    total, sums, n = 0.0, np.zeros(resamples), 0
    for task in tasks:
        def outcome(runs: dict[int, dict[str, Any]], task: str = task) -> np.ndarray:
            return np.mean([np.frombuffer(runs[s]["correct"][task].encode(), np.uint8) - 48 for s in seeds], axis=0)
        diff = outcome(reference) - outcome(method)
        total += diff.sum()
        sums += diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].sum(axis=1)
        n += len(diff)
    low, high = np.percentile(sums / n, [2.5, 97.5])
    return {"diff": float(total / n), "low": float(low), "high": float(high), "seeds": seeds, "questions": n}
