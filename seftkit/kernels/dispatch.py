"""Sparse kernel or dense torch: the faster of the two per layer shape and batch-size bucket, timed at first use.

The kernels win where a product is memory bound (decode-size batches); at prefill-size batches dense torch
(oneDNN, AMX where the CPU has it) can win, and a sparsified model must never be slower than the dense one it
replaces. So the first call of a layer in a bucket times both paths on that layer and the choice is kept for
every layer with the same shape, density, pattern, dtypes, thread count and kernel ISA. The timer is injectable,
which makes the choice deterministic in tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from seftkit.kernels.sparse_linear import SparseLinear

# A call with n rows belongs to the smallest bucket >= n and is decided by a timing at that many rows;
# above the last bucket, one more bucket timed at LARGE_ROWS rows.
BUCKETS = (1, 4, 16, 64)
LARGE_ROWS = 256
_TIMED_ROUNDS = 3

# rows, activation dtype -> (sparse ms, dense ms)
Timer = Callable[["SparseLinear", int, torch.dtype], tuple[float, float]]


def bucket(rows: int) -> int:
    """The batch-size bucket a call with ``rows`` activation rows is decided in."""
    return next((b for b in BUCKETS if rows <= b), LARGE_ROWS)


@dataclass(frozen=True)
class ChoiceKey:
    """What decides the speed of a call, so layers that share it share one timing."""

    shape: tuple[int, int]
    weight_dtype: torch.dtype
    x_dtype: torch.dtype
    nm: tuple[int, int] | None
    density: float  # rounded to 0.01: layers pruned alike share a decision
    threads: int
    isa: int
    bucket: int


def time_paths(layer: SparseLinear, rows: int, x_dtype: torch.dtype) -> tuple[float, float]:
    """Best-of-three ms of the kernel and of dense ``F.linear`` on this layer, taking turns after a warm-up."""
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(0)).to(x_dtype)
    paths = (layer.sparse_forward, layer.dense_forward)
    best = [float("inf"), float("inf")]
    for path in paths:
        path(x)
    for _ in range(_TIMED_ROUNDS):
        for i, path in enumerate(paths):
            start = time.perf_counter()
            path(x)
            best[i] = min(best[i], (time.perf_counter() - start) * 1e3)
    return best[0], best[1]


class KernelChoice:
    """Remembers, per :class:`ChoiceKey`, whether the sparse kernel was at least as fast as dense."""

    def __init__(self, timer: Timer = time_paths) -> None:
        self.timer = timer
        self.decisions: dict[ChoiceKey, bool] = {}
        self.timings: dict[ChoiceKey, tuple[float, float]] = {}

    def __deepcopy__(self, memo: dict) -> KernelChoice:
        return self  # a copied model keeps sharing the timings (they describe this machine, not the model)

    def key(self, layer: SparseLinear, rows: int, x_dtype: torch.dtype) -> ChoiceKey:
        density = layer.packed.nnz / (layer.out_features * layer.in_features)
        return ChoiceKey((layer.out_features, layer.in_features), layer.values.dtype, x_dtype, layer.nm,
                         round(density, 2), torch.get_num_threads(), int(layer.isa), bucket(rows))

    def use_sparse(self, layer: SparseLinear, rows: int, x_dtype: torch.dtype) -> bool:
        key = self.key(layer, rows, x_dtype)
        if key not in self.decisions:
            sparse_ms, dense_ms = self.timer(layer, key.bucket, x_dtype)
            self.timings[key] = (sparse_ms, dense_ms)
            self.decisions[key] = sparse_ms <= dense_ms
        return self.decisions[key]


# The process-wide choice every SparseLinear consults unless given its own.
DEFAULT_CHOICE = KernelChoice()
