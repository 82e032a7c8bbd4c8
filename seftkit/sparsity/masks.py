"""Keep-masks from scores (torch). One implementation serves prune, repair and the kernels.

A mask is a bool tensor shaped like the weight ([out, in]); True means *keep*. Counts are exact: ties are
broken by position (stable sort), so the same scores always give the same mask.
"""

from __future__ import annotations

import torch

from seftkit.errors import SeftkitError
from seftkit.sparsity.pattern import SparsityPattern


def prune_count(numel: int, sparsity: float) -> int:
    """How many weights a fraction removes (floor, as Wanda and SparseGPT do)."""
    return int(numel * sparsity)


def smallest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask that drops exactly the ``count`` smallest scores of the whole tensor."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        order = torch.argsort(scores.reshape(-1).float(), stable=True)
        keep[order[:count]] = False
    return keep.reshape(scores.shape)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Drop the lowest-scoring ``sparsity`` fraction, per matrix or per output row."""
    if not per_row:
        return smallest_mask(scores, prune_count(scores.numel(), sparsity))
    rows, cols = scores.shape
    count = prune_count(cols, sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count > 0:
        order = torch.argsort(scores.float(), dim=1, stable=True)
        keep.scatter_(1, order[:, :count], False)
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of ``m`` consecutive inputs of each row, drop the ``n`` lowest scores."""
    rows, cols = scores.shape
    if cols % m:
        raise SeftkitError(f"N:M {n}:{m} needs the input width ({cols}) to be a multiple of {m}")
    groups = scores.float().reshape(rows, cols // m, m)
    order = torch.argsort(groups, dim=2, stable=True)
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, order[..., :n], False)
    return keep.reshape(rows, cols)


def pattern_mask(scores: torch.Tensor, pattern: SparsityPattern, per_row: bool = False) -> torch.Tensor:
    """Keep-mask for a pattern: N:M groups, or an unstructured fraction (per matrix or per row)."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return unstructured_mask(scores, pattern.fraction, per_row=per_row)


def nm_valid(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive inputs of every row has at least ``n`` zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    zeros = (weight == 0).reshape(rows, cols // m, m).sum(dim=2)
    return bool((zeros >= n).all())
