"""Repair memory and step time at the ~1B scale, on a random-initialised LLaMA-shaped model (no download).

    python -m seftkit.bench.repair_memory [--methods seft,masked-lora,lora-prune,static] [--steps 3] [--json F]

Protocol (every number comes from this one run):
- a LLaMA model of TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 22 layers, 32 heads / 4 KV heads) is built from
  its config with random weights in ``--dtype``, magnitude-pruned to ``--sparsity`` and saved once to a temporary
  folder with the default model's tokenizer (the vocabulary follows that tokenizer);
- each method then repairs it for ``--steps`` steps (SEFT with one topology update: ``--update-interval 2
  --accumulation-steps 1``) in a fresh process, so its peak belongs to it alone. As in
  :mod:`seftkit.bench.repair_compare`, glibc's mmap threshold is fixed so the resident high-water mark
  (``VmHWM``) follows live tensors, and the peak is reset once the loaded model is resident: "+MB" is the peak
  minus that resident model, i.e. what training adds. The fixed threshold slows training a little, equally for
  every method;
- seconds per step are the trainer's (training steps only, the boundary step included; SEFT's initial gradient
  probe is not a step); "steady" leaves out the topology updates (timed apart, "updates": how many and seconds
  each), which a real run spreads over ``--update-interval`` steps (20 by default) where this one has one in
  ``--steps``. Ratios are over masked-lora's and static's numbers from the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from seftkit.bench.repair_compare import ALLOCATOR_ENV
from seftkit.bench.repair_compare_worker import (
    add_worker_options,
    peak_rss_since_reset_mb,
    reset_peak_rss,
    run_in_subprocess,
    serve_worker,
)
from seftkit.models import DEFAULT_MODEL
from seftkit.repair.config import RepairConfig
from seftkit.repair.registry import REPAIR_METHODS, baseline_methods

DEFAULT_METHODS = ("seft", *baseline_methods())
REFERENCES = ("masked-lora", "static")
TINYLLAMA_SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                   "num_attention_heads": 32, "num_key_value_heads": 4}


def build_pruned_model(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Random LLaMA of the requested shape, magnitude-pruned, saved with the default model's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from seftkit.models import resolve_dtype, resolve_model_path
    from seftkit.prune import prune_model
    from seftkit.sparsity.pattern import parse_pattern

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(args.dtype))
    report = prune_model(model, tokenizer, "magnitude", parse_pattern(args.sparsity), progress=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer),
            "target_weights": sum(t["numel"] for t in report.tensors.values()),
            "sparsity": report.overall_sparsity}


def model_name(args: argparse.Namespace) -> str:
    """The ``--workdir`` folder of a built model: everything its weights depend on."""
    return (f"llama-h{args.hidden}-i{args.intermediate}-l{args.layers}-a{args.heads}-kv{args.kv_heads}-{args.dtype}"
            f"-magnitude-{round(args.sparsity * 100)}")


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One method's run (inside its own process): load, make resident, repair, read the high-water mark."""
    import psutil
    import torch

    from seftkit.models import check_finite, load_model
    from seftkit.repair import repair_model

    torch.set_num_threads(job["threads"])
    model, tokenizer = load_model(job["model"], dtype=job["dtype"])
    check_finite(model)  # reads every weight: the memory-mapped model is resident before the baseline
    loaded_mb = psutil.Process().memory_info().rss / 2**20
    updates = time_topology_updates()
    reset_peak_rss()
    report = repair_model(model, tokenizer, RepairConfig(**job["config"]), progress=False)
    peak_mb = peak_rss_since_reset_mb()
    return {"loaded_rss_mb": loaded_mb, "peak_rss_mb": peak_mb, "train_extra_mb": peak_mb - loaded_mb,
            "trainable": report.trainable_params, "step_time_s": report.step_time_s,
            "update_s": sum(updates), "updates": len(updates),
            "steady_step_s": (report.train_time_s - sum(updates)) / report.steps_done,
            "wall_time_s": report.wall_time_s, "final_loss": report.final_loss}


def time_topology_updates() -> list[float]:
    """Seconds of every training step's method update that reported an event (SEFT's topology updates),
    appended to the returned list while :func:`repair_model` runs in this process."""
    from seftkit.repair import trainer

    seconds: list[float] = []
    build_method = trainer.build_method

    def timed(config: RepairConfig):
        method = build_method(config)
        update = method.after_optimizer_step

        def after_optimizer_step(step, optimizer):
            tick = time.perf_counter()
            event = update(step, optimizer)
            if event is not None:
                seconds.append(time.perf_counter() - tick)
            return event

        method.after_optimizer_step = after_optimizer_step
        return method

    trainer.build_method = timed
    return seconds


def run_method(model_dir: Path, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`worker` for ``method`` in a fresh interpreter; a failed run is reported, not raised."""
    config = {"method": method, "steps": args.steps, "batch_size": args.batch_size, "seqlen": args.seqlen,
              "lr": 1e-4, "seed": 0}
    if REPAIR_METHODS[method].options:  # SEFT's: a topology update every 2 steps, so a short run times some
        config.update(update_interval=2, accumulation_steps=1)
    job = {"model": str(model_dir), "dtype": args.dtype, "threads": args.threads, "config": config}
    return run_in_subprocess("seftkit.bench.repair_memory", job, ALLOCATOR_ENV)


def format_table(runs: dict[str, dict[str, Any]]) -> list[str]:
    """One row per method: peak, +MB, s/step, and s/step without topology updates, each over masked-lora's and
    static's; then the seconds of the topology updates."""
    ok = {name: run for name, run in runs.items() if "error" not in run}
    refs = [name for name in REFERENCES if name in ok]

    def cells(name: str, key: str, fmt: str) -> str:
        value = ok[name][key]
        ratios = "".join(f"{value / ok[ref][key]:>8.2f}" for ref in refs)
        return f"{value:>{fmt}}{ratios}"

    header = "".join(f"{'/' + ref[:6]:>8}" for ref in refs)
    lines = [f"{'method':<13}{'trainable':>12}{'peak MB':>9}{header}{'+MB':>8}{header}{'s/step':>8}{header}"
             f"{'steady':>8}{header}{'updates':>9}"]
    for name, run in runs.items():
        if name not in ok:
            lines.append(f"{name:<13}failed: {run['error']}")
            continue
        lines.append(f"{name:<13}{run['trainable']:>12,}{cells(name, 'peak_rss_mb', '9.0f')}"
                     f"{cells(name, 'train_extra_mb', '8.0f')}{cells(name, 'step_time_s', '8.2f')}"
                     f"{cells(name, 'steady_step_s', '8.2f')}"
                     f"{run['updates']:>3} x {run['update_s'] / max(run['updates'], 1):.1f} s")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated repair methods")
    parser.add_argument("--hidden", type=int, default=TINYLLAMA_SHAPE["hidden_size"])
    parser.add_argument("--intermediate", type=int, default=TINYLLAMA_SHAPE["intermediate_size"])
    parser.add_argument("--layers", type=int, default=TINYLLAMA_SHAPE["num_hidden_layers"])
    parser.add_argument("--heads", type=int, default=TINYLLAMA_SHAPE["num_attention_heads"])
    parser.add_argument("--kv-heads", type=int, default=TINYLLAMA_SHAPE["num_key_value_heads"])
    parser.add_argument("--dtype", default="bf16", help="weights as stored and trained (bf16, as TinyLlama ships)")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (the machine is shared)")
    parser.add_argument("--workdir", type=Path, help="keep the built model here and reuse it (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="write the settings and every run here")
    add_worker_options(parser)
    args = parser.parse_args()
    if serve_worker(args, worker):
        return
    methods = [m for m in args.methods.split(",") if m]
    if unknown := [m for m in methods if m not in REPAIR_METHODS]:
        parser.error(f"unknown method {', '.join(unknown)}; choose from {', '.join(REPAIR_METHODS)}")
    with tempfile.TemporaryDirectory(prefix="seftkit-repair-memory-") as tmp:
        model_dir = Path(tmp) if args.workdir is None else args.workdir / model_name(args)
        info = model_dir / "bench_model.json"
        if not info.is_file():
            started = time.perf_counter()
            built = build_pruned_model(args, model_dir)
            info.write_text(json.dumps({**built, "build_s": time.perf_counter() - started}))
        model = json.loads(info.read_text())
        print(f"model: {model['params'] / 1e9:.2f} B parameters, vocab {model['vocab']}, {args.dtype}, "
              f"magnitude {args.sparsity:.0%} ({model['build_s']:.0f} s to build)", file=sys.stderr)
        runs = {}
        for method in methods:
            runs[method] = run_method(model_dir, method, args)
            print(f"{method}: {runs[method]}", file=sys.stderr)
    lines = format_table(runs)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "model": model,
                                         "runs": runs, "table": lines}, indent=1))


if __name__ == "__main__":
    main()
