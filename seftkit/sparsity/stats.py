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
    nm_violations: int | None = None  # how many groups have fewer than N zeros

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
        in_features = zero.shape[0] if transposed else zero.shape[1]
        if in_features % pattern.m:
            stats.nm_ok = False
            stats.nm_first_violation = (0, in_features - in_features % pattern.m)
        else:
            bad = group_zero_counts(zero, pattern.m, transposed) < pattern.n  # [out, in // m]
            stats.nm_violations = int(np.count_nonzero(bad))
            stats.nm_ok = stats.nm_violations == 0
            if not stats.nm_ok:
                row, group = divmod(int(np.argmax(bad)), bad.shape[1])
                stats.nm_first_violation = (row, group * pattern.m)
    return stats


def group_zero_counts(zero: np.ndarray, m: int, transposed: bool = False) -> np.ndarray:
    """Zeros in each group of ``m`` consecutive inputs, as an [out, in // m] array.

    Adds the ``m`` members of every group with one vectorised pass each: numpy's ``sum`` over a tiny last
    axis is about ten times slower, and verify streams whole checkpoints through this.
    """
    if transposed:  # [in, out]: a group is m consecutive rows
        groups = zero.reshape(zero.shape[0] // m, m, zero.shape[1])
        members = [groups[:, k] for k in range(m)]
    else:
        groups = zero.reshape(zero.shape[0], zero.shape[1] // m, m)
        members = [groups[..., k] for k in range(m)]
    counts = members[0].astype(np.min_scalar_type(m))
    for member in members[1:]:
        counts += member
    return counts.T if transposed else counts


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
