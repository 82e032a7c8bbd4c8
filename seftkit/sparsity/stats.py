"""Sparsity statistics over zero masks (numpy), shared by verify (raw bytes) and the torch commands."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from seftkit.sparsity.pattern import SparsityPattern
from seftkit.sparsity.targets import layer_index


@dataclass
class TensorStats:
    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    nm_ok: bool | None = None
    nm_first_violation: tuple[int, int] | None = None  # (row, first input column of the bad group)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def nnz(self) -> int:
        return self.numel - self.zeros


def zero_stats(
    name: str, zero: np.ndarray, pattern: SparsityPattern | None = None, transposed: bool = False
) -> TensorStats:
    """Count zeros of a 2-D bool array ``zero`` ([out, in], or [in, out] when ``transposed``)."""
    zeros = int(np.count_nonzero(zero))
    stats = TensorStats(name=name, shape=tuple(zero.shape), numel=int(zero.size), zeros=zeros)
    if pattern is not None and pattern.is_nm:
        rows = zero.T if transposed else zero
        out_features, in_features = rows.shape
        if in_features % pattern.m:
            stats.nm_ok = False
            stats.nm_first_violation = (0, in_features - in_features % pattern.m)
        else:
            per_group = rows.reshape(out_features, in_features // pattern.m, pattern.m).sum(axis=2)
            bad = np.argwhere(per_group < pattern.n)
            stats.nm_ok = bad.size == 0
            if bad.size:
                stats.nm_first_violation = (int(bad[0][0]), int(bad[0][1]) * pattern.m)
    return stats


@dataclass
class Summary:
    numel: int = 0
    zeros: int = 0
    per_layer: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


def summarize(stats: list[TensorStats]) -> Summary:
    """Global and per-decoder-layer sparsity from per-tensor stats."""
    totals: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    summary = Summary()
    for s in stats:
        summary.numel += s.numel
        summary.zeros += s.zeros
        idx = layer_index(s.name)
        if idx is not None:
            totals[idx][0] += s.numel
            totals[idx][1] += s.zeros
    summary.per_layer = {
        i: {"numel": n, "zeros": z, "sparsity": z / n if n else 0.0} for i, (n, z) in sorted(totals.items())
    }
    return summary
