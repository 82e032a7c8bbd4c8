"""seftkit: prune, repair (SEFT), verify, benchmark and export sparse LLMs.

The public API loads lazily, so ``import seftkit`` (and ``seftkit verify``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_model": "seftkit.models",
    "SeftkitError": "seftkit.errors",
    "SparsityPattern": "seftkit.sparsity.pattern",
    "verify_model": "seftkit.verify",
    "prune_model": "seftkit.prune",
    "repair_model": "seftkit.repair",
    "export_model": "seftkit.exporters",
    "evaluate": "seftkit.eval",
    "perplexity": "seftkit.eval",
    "sparsify_model": "seftkit.kernels",
    "generate": "seftkit.generation",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'seftkit' has no attribute {name!r}")
