"""Magnitude pruning: the calibration-free baseline every other method is measured against.

Unstructured sparsity drops the smallest ``|W|`` of the whole matrix (one threshold per matrix); N:M drops
the ``n`` smallest ``|W|`` in every group of ``m`` consecutive inputs of a row.
"""

from __future__ import annotations

import torch

from seftkit.sparsity.masks import pattern_mask
from seftkit.sparsity.pattern import SparsityPattern


def magnitude_mask(weight: torch.Tensor, stats: None, pattern: SparsityPattern) -> torch.Tensor:
    """Keep-mask of an ``[out, in]`` weight by absolute value (``stats`` is unused: no calibration)."""
    return pattern_mask(weight.abs(), pattern, per_row=False)
