"""The one sparsity core: patterns, target selection, masks and statistics.

``pattern`` and ``targets`` and ``stats`` are torch-free (``seftkit verify`` runs without torch);
``masks`` needs torch and is what prune, repair and the kernels use to build masks.
"""

from seftkit.sparsity.pattern import SparsityPattern, parse_nm, parse_pattern
from seftkit.sparsity.stats import TensorStats, summarize, zero_stats
from seftkit.sparsity.targets import TargetRule, layer_index

__all__ = [
    "SparsityPattern",
    "TargetRule",
    "TensorStats",
    "layer_index",
    "parse_nm",
    "parse_pattern",
    "summarize",
    "zero_stats",
]
