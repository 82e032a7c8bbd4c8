"""How fast ``seftkit verify`` streams a checkpoint, in MB/s of safetensors on disk (not a test).

Usage: ``python -m seftkit.bench.verify_speed [MODEL] [--repeats N]``. The first pass warms the page cache
so the number measures verify, not the disk; the best of the repeats is reported because other work on a
shared machine only ever slows a run down. Throughput counts the whole checkpoint (what a CI job waits
for); the bytes actually scanned (the targeted weights) are printed next to it.
"""

from __future__ import annotations

import argparse
import time

from seftkit.models import DEFAULT_MODEL
from seftkit.sparsity.pattern import SparsityPattern
from seftkit.verify import resolve_checkpoint, verify_model

MB = 1e6


def best_seconds(model: str, pattern: SparsityPattern | None, repeats: int) -> float:
    """Best wall time of ``repeats`` verify runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        verify_model(model, pattern)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    _, files = resolve_checkpoint(args.model)
    size = sum(f.stat().st_size for f in files)
    report = verify_model(args.model)  # warm the page cache
    print(f"{args.model}: {size / MB:.0f} MB in {len(files)} file(s), {report.scanned_bytes / MB:.0f} MB targeted")
    for label, pattern in (("sparsity only", None), ("--sparsity 0.5", SparsityPattern(sparsity=0.5)),
                           ("--nm 2:4", SparsityPattern(n=2, m=4))):
        seconds = best_seconds(args.model, pattern, args.repeats)
        print(f"{label:>15}: {seconds:.3f} s  {size / MB / seconds:,.0f} MB/s")


if __name__ == "__main__":
    main()
