"""Wanda (Sun et al., 2023): prune by ``|W_ij| * ||X_j||_2``, compared within each output row.

The input statistic is the mean over calibration tokens of ``x_j^2``; its square root is ``||X_j||_2 / sqrt(N)``,
a per-matrix constant factor away from the paper's norm, so the masks are identical (Wanda's own code does the
same). Comparing per row rather than per matrix is what makes Wanda work without any weight update.

One deliberate difference: each row drops ``ceil(in * sparsity)`` weights, where the paper truncates. Truncation
loses up to one weight per row (0.17% on 576-wide rows, more than ``seftkit verify``'s tolerance), so a model
pruned to S could fail ``verify --sparsity S``; rounding up guarantees every row, hence every matrix, reaches S.
"""

from __future__ import annotations

import math

import torch

from seftkit.sparsity.masks import nm_mask
from seftkit.sparsity.pattern import SparsityPattern


def input_sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Additive per-batch statistic: sum over tokens of each input feature squared (``x`` is ``[tokens, in]``)."""
    x = x.float()
    return (x * x).sum(dim=0)


def wanda_scores(weight: torch.Tensor, mean_sq: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||`` (up to a constant factor) as float32, ``[out, in]``."""
    return weight.float().abs() * mean_sq.to(weight.device).sqrt().unsqueeze(0)


def row_prune_count(width: int, sparsity: float) -> int:
    """Weights each row drops: enough that the row is at least ``sparsity`` sparse (guarded against float fuzz)."""
    return min(width, math.ceil(width * sparsity - 1e-9))


def wanda_mask(weight: torch.Tensor, mean_sq: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Keep-mask: the lowest scores of each output row, or of each group of ``m`` inputs for N:M."""
    scores = wanda_scores(weight, mean_sq)
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return drop_lowest_per_row(scores, row_prune_count(scores.shape[1], pattern.fraction))


def drop_lowest_per_row(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask dropping the ``count`` lowest scores of every row, ties going to the lower column index (what a
    stable sort gives). A partial selection finds each row's threshold; only rows whose threshold value repeats
    are sorted, which makes the common case several times cheaper than sorting every row."""
    if count == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.topk(scores, count, dim=1, largest=False, sorted=False).values.amax(dim=1, keepdim=True)
    keep = scores > threshold
    tied = (keep.sum(dim=1) != scores.shape[1] - count).nonzero().squeeze(1)
    if tied.numel():
        order = torch.argsort(scores[tied], dim=1, stable=True)
        keep[tied] = torch.ones_like(order, dtype=torch.bool).scatter_(1, order[:, :count], False)
    return keep
