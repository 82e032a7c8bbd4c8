"""``seftkit bench``: how much faster a sparse model runs here, against the fastest dense torch baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from seftkit.cli.common import handle_errors, json_option, show_progress, write_report
from seftkit.errors import SeftkitError
from seftkit.sparsity.pattern import parse_pattern


@dataclass
class BenchRun:
    threads: int
    layers: Any  # seftkit.bench.layers.LayerBench
    decode: Any = None  # seftkit.bench.decode.DecodeResult when a MODEL was given


@dataclass
class BenchReport:
    runs: list[BenchRun]  # one per thread count


def parse_int_list(text: str, option: str, all_value: int | None = None) -> list[int]:
    """Comma-separated positive integers; ``all`` stands for ``all_value`` where one is given."""
    words = [part.strip() for part in text.split(",") if part.strip()]
    try:
        values = [all_value if all_value is not None and w == "all" else int(w) for w in words]
    except ValueError:
        raise SeftkitError(f"{option} takes comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise SeftkitError(f"{option} takes comma-separated positive integers, got {text!r}")
    return list(dict.fromkeys(values))


@click.command()
@click.argument("model", required=False)
@click.option("--sparsity", type=float, help="Unstructured sparsity to prune to (e.g. 0.7).")
@click.option("--nm", help="N:M pattern to prune to (e.g. 2:4).")
@click.option("--batch", default="1,4,16,64", show_default=True,
              help="Comma-separated batch sizes (tokens per call).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="Weight dtype of the sparse kernels and the model; dense runs in bf16 and fp32 regardless.")
@click.option("--threads", default="1,all", show_default=True,
              help="Comma-separated torch thread counts to run at; 'all' is every core.")
@click.option("--backends", default="dense-bf16,dense-fp32,sparse,auto", show_default=True,
              help="Comma-separated: dense-bf16, dense-fp32, sparse (the kernel), auto (sparsify_model's per-batch "
                   "choice of kernel or dense), csr (torch CSR), cuda24 (GPU 2:4).")
@click.option("--tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Greedy tokens per decode run (with MODEL).")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Interleaved timing rounds (min and median are reported).")
@click.option("--no-stream", is_flag=True, help="Time hot-cache weights instead of streaming 2x L3 of copies.")
@json_option
@handle_errors
def bench(model: str | None, sparsity: float | None, nm: str | None, batch: str, dtype: str, threads: str,
          backends: str, tokens: int, rounds: int, no_stream: bool, json_path: str | None) -> None:
    """Time sparse kernels against dense torch, per layer shape and (with MODEL) for end-to-end decode.

    Without MODEL: LLaMA-7B and SmolLM2-135M layer shapes with random weights pruned to the pattern. With
    MODEL (HF folder or smollm2-135m): that model, pruned by magnitude to the pattern, per distinct layer
    shape and as greedy decode tokens/s, dense vs sparse. Speedups are against the fastest dense path.
    """
    import os

    pattern = parse_pattern(sparsity, nm)
    batches = parse_int_list(batch, "--batch")
    thread_counts = parse_int_list(threads, "--threads", all_value=len(os.sched_getaffinity(0)))
    chosen = tuple(name.strip() for name in backends.split(",") if name.strip())

    import torch

    from seftkit.bench.decode import bench_decode, distinct_linear_weights, format_decode, load_pruned
    from seftkit.bench.layers import LLAMA7B_BLOCK, SMOLLM2_BLOCK, bench_layers, format_layers
    from seftkit.models import resolve_dtype

    torch_dtype = resolve_dtype(dtype)
    if model is None:
        pruned, tokenizer, weights = None, None, None
        sets = {"LLaMA-7B block": LLAMA7B_BLOCK, "SmolLM2-135M block": SMOLLM2_BLOCK}
    else:
        pruned, tokenizer = load_pruned(model, pattern, dtype)
        weights, counts = distinct_linear_weights(pruned)
        sets = {f"{model} (all targeted linears)": counts}
    shapes = [shape for counts in sets.values() for shape in counts]
    report = BenchReport([])
    for count in thread_counts:
        torch.set_num_threads(count)
        run = BenchRun(count, bench_layers(shapes, pattern, batches, torch_dtype, chosen, rounds, not no_stream,
                                           weights, sets, progress=show_progress()))
        click.echo("\n".join(format_layers(run.layers)))
        if pruned is not None and "sparse" in chosen:
            run.decode = bench_decode(pruned, tokenizer, model, tokens, rounds, progress=show_progress())
            click.echo("\n".join(format_decode(run.decode)))
        report.runs.append(run)
    write_report(json_path, report)
