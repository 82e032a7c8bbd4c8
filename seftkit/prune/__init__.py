"""``seftkit prune``: magnitude, Wanda and SparseGPT, unstructured or N:M, for any HF decoder-only model.

Every method is one pruner function ``(weight [out, in], stats, pattern) -> keep-mask`` plus, for the methods
that look at activations, the additive input statistic it needs, registered in :mod:`seftkit.prune.registry`;
the shared layer-by-layer loop in :mod:`seftkit.prune.calibrate` feeds them. :func:`prune_model` prunes a loaded
model in place; :func:`prune_checkpoint` is load -> prune -> save for the CLI, or with ``low_memory`` the same
block by block from the safetensors files (:mod:`seftkit.prune.streaming`), bit-identical.

Under ``torchrun --nproc-per-node N`` the calibration windows are split across the ranks and their statistics
summed (see :mod:`seftkit.prune.calibrate`); every rank prunes its replica identically (checked) and rank 0 writes.
The package's names load lazily so that :mod:`seftkit.prune.registry` (the CLI's ``--method`` choices) imports
without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "PruneReport": "seftkit.prune.api",
    "REPORT_NAME": "seftkit.prune.api",
    "calibration_windows": "seftkit.prune.api",
    "default_out": "seftkit.prune.api",
    "prune_checkpoint": "seftkit.prune.api",
    "prune_model": "seftkit.prune.api",
    "prune_streamed": "seftkit.prune.api",
    "PRUNERS": "seftkit.prune.registry",
    "PrunerSpec": "seftkit.prune.registry",
    "get_pruner": "seftkit.prune.registry",
}

__all__ = list(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'seftkit.prune' has no attribute {name!r}")
