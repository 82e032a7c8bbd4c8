"""Wanda (Sun et al., 2023): prune by ``|W_ij| * ||X_j||_2``, compared within each output row.

The input statistic is the mean over calibration tokens of ``x_j^2``; its square root is ``||X_j||_2 / sqrt(N)``,
a per-matrix constant factor away from the paper's norm, so the masks are identical (Wanda's own code does the
same). Comparing per row rather than per matrix is what makes Wanda work without any weight update.
"""

from __future__ import annotations

import torch

from seftkit.sparsity.masks import pattern_mask
from seftkit.sparsity.pattern import SparsityPattern


def input_sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Additive per-batch statistic: sum over tokens of each input feature squared (``x`` is ``[tokens, in]``)."""
    x = x.float()
    return (x * x).sum(dim=0)


def wanda_scores(weight: torch.Tensor, mean_sq: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||`` (up to a constant factor) as float32, ``[out, in]``."""
    return weight.float().abs() * mean_sq.sqrt().unsqueeze(0)


def wanda_mask(weight: torch.Tensor, mean_sq: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Keep-mask: per output row for unstructured sparsity, per group of ``m`` inputs for N:M."""
    return pattern_mask(wanda_scores(weight, mean_sq.to(weight.device)), pattern, per_row=True)
